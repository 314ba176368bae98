"""Everything judged by running code: benchmarks, decontamination, (later) the sandbox and pass@k."""
