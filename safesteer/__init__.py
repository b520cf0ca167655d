"""SafeSteer: localized on-policy distillation for safety alignment."""

__version__ = "0.1.0"
