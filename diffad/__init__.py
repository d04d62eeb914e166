"""diffad: find and explain defects in product photos with a denoising diffusion model.

Implements "Removing Anomalies as Noises for Industrial Defect Localization" (Lu et al., ICCV 2023).
"""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DataError, read_image
from .detector import AnomalyDetector, Prediction

__all__ = ["AnomalyDetector", "Prediction", "CheckpointError", "DataError", "load_checkpoint", "save_checkpoint", "read_image"]
__version__ = "0.1.0"
