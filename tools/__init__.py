"""What the scripts share: the command-line conventions and one error policy (tools.cli).
Library code lives in graphs/, contract/, export/, runtime/, benchmarks/, evaluation/."""
