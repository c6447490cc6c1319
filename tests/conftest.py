import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "rubberband_airflow" / "examples"


@pytest.fixture
def resnet_problem() -> dict:
    """The example problem of the model page: ResNet on p3 instances, 64 trials, eta 4."""
    return json.loads((EXAMPLES / "problem-resnet-p3.json").read_text())


# The plan of the model page's worked example.
WORKED_PLAN = {"instance_type": "p3.8xlarge",
               "stages": [{"gpus_per_trial": 1, "instances": 4}, {"gpus_per_trial": 1, "instances": 4},
                          {"gpus_per_trial": 1, "instances": 1}, {"gpus_per_trial": 4, "instances": 1}]}
