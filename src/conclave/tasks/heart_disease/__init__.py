"""Fed-Heart-Disease (FLamby): UCI heart disease data from four hospitals, one per participant.

Participants are named ``hospital-0`` .. ``hospital-3`` (Cleveland, Hungary, Switzerland,
VA Long Beach). The model is FLamby's: logistic regression on 13 standardised features.

Run-spec factories: ``conclave.tasks.heart_disease:make_trainer`` (numpy) and
``conclave.tasks.heart_disease:make_torch_trainer`` (PyTorch, needs ``conclave[torch]``).
"""

from conclave.tasks.heart_disease.dataset import (
    FEATURE_NAMES,
    HOSPITALS,
    NUM_FEATURES,
    DataIntegrityError,
    HospitalData,
    hospital_index,
    load_hospital,
)
from conclave.tasks.heart_disease.task import (
    DEFAULT_CONFIG,
    FLAMBY_BASELINES,
    initial_parameters,
    make_torch_trainer,
    make_trainer,
)

__all__ = [
    "DEFAULT_CONFIG",
    "FEATURE_NAMES",
    "FLAMBY_BASELINES",
    "HOSPITALS",
    "NUM_FEATURES",
    "DataIntegrityError",
    "HospitalData",
    "hospital_index",
    "initial_parameters",
    "load_hospital",
    "make_torch_trainer",
    "make_trainer",
]
