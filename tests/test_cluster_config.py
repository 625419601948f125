"""cluster.yaml is a valid Ray cluster-launcher config for the installed Ray."""

from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_rays_schema():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))  # raises on a schema error


def test_cluster_image_matches_the_installed_ray_and_has_gpus():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] >= 1 and gpu["min_workers"] == 0
    assert any(
        "mlflow server" in c and "postgresql://" in c for c in config["head_start_ray_commands"]
    )
    assert any("pip install" in c and "leadtune" in c for c in config["setup_commands"])
