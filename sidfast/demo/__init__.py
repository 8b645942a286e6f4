"""The embedded demo: a digits teacher trained from scratch, distilled with SiD (and SiDA, guidance, K steps),
compared by Frechet distance."""
from sidfast.demo.run import DemoConfig, demo_config, run_demo

__all__ = ["run_demo", "demo_config", "DemoConfig"]
