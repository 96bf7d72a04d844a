"""What the scripts share: the command-line conventions and one error policy (tools.cli) and
benchmark helpers (tools.roofline). Library code lives in graphs/, contract/, export/, runtime/."""
