"""Training and fine-tuning: the staged pipeline (VAE, UNet, ControlNet), its config, data, losses and loop."""
