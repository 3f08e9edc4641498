"""The tools built on the pipeline: convert, inspect, bake, merging LoRAs, block weights, the AutoLoRA gate, ControlNet conversion, the matrix, the library."""
