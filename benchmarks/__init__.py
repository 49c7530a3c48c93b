"""fnlearn against PyTorch, side by side: the bench, the profiler split and the PyTorch reference nets.

    python -m benchmarks                    # every workload (see `python -m benchmarks --help`)
    python -m benchmarks.profile fastnet    # where a train step spends its time, on both sides

`workloads` describes what each side runs, `timing` how a workload is timed, and
`torch_models` holds the PyTorch twins of fnlearn's models (also for the parity tests).
Nothing in `fnlearn` imports this package.
"""
