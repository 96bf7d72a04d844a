"""One module per command: parse the flags into config dataclasses, make one library call, print.
`scripts/NAME.py` and `var-ssg NAME` both land in `tools.commands.NAME.main(argv)`."""
