"""The generation engine: configs and presets, MONAI networks, schedulers, geometry rules, decoding, weights and model directories, and MaisiPipeline."""
