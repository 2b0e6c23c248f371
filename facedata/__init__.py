"""Face data on disk: training folders and record files, the evaluation .bin format and its builder, dataset
preparation."""
