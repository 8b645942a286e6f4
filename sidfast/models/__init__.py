"""What wraps a network: the denoiser interface and its adapters (EDM, diffusers, flow), LoRA, SiDA's
discriminator taps, text encoders and VAEs, and network checkpoint files."""
