"""Applications built on the library (the `cliptune` command, the demo, the benchmark, dataset
download). The library never imports from here."""
