"""ldmclip's side-by-side benchmark suite against OpenCLIP and transformers: ``python -m benchmarks``
(or ``python benchmarks/run.py``); see BENCHMARKS.md."""
