"""diffad: find and explain defects in product photos with a denoising diffusion model.

Implements "Removing Anomalies as Noises for Industrial Defect Localization" (Lu et al., ICCV 2023).
"""
from .calibration import Calibration, calibrate
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DataError, read_image
from .detector import AnomalyDetector
from .postprocess import Prediction
from .scoring import ScoringConfig

__all__ = ["AnomalyDetector", "Calibration", "Prediction", "ScoringConfig", "calibrate", "CheckpointError", "DataError",
           "load_checkpoint", "save_checkpoint", "read_image"]
__version__ = "0.1.0"
