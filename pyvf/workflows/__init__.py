"""What a user runs end to end, one module each, each with `add_args(parser)` and
`main(args)` for its `pyvf` command: evaluate, sft, bon, rationalize, selfplay, demo."""
