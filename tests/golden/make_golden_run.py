"""Write the golden run directory of card format version 1 (run once; the output is committed).

    python tests/golden/make_golden_run.py

Trains a 2-epoch CoOp on the tiny backbone (seed 0) over a generated dataset, keeps the files a
later biomedap must still read (card.json, config.yaml, state.safetensors), and stores features
with the logits this version computed for them.
"""

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from biomedap.backbone import build_tiny_backbone
from biomedap.config import resolve_run_config
from biomedap.data.synthetic import make_synthetic_dataset
from biomedap.features import FeatureCache
from biomedap.methods import Batch
from biomedap.runs import load_run, run_experiment

HERE = Path(__file__).parent

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    data = make_synthetic_dataset(tmp / "data", name="GOLD", n_train=4, n_val=2, n_test=2, seed=3)
    backbone = build_tiny_backbone(seed=0)
    config = resolve_run_config("coop", overrides=[
        f"data.dataset={data}", "data.shots=4", "backbone=tiny:0", f"output_dir={tmp / 'runs'}", "device=cpu",
        "optim.epochs=2", "data.views=1", "optim.lr=0.05", "optim.batch_size=8"])
    result = run_experiment(config, backbone=backbone, cache=FeatureCache(tmp / "cache"), progress=False)
    target = HERE / "run_v1"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for name in ("card.json", "config.yaml", "state.safetensors"):
        shutil.copy(result.run_dir / name, target / name)
    method, _ = load_run(target, backbone=backbone)
    features = torch.nn.functional.normalize(torch.randn(6, backbone.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        logits = method(Batch(features=features))
    save_file({"features": features, "logits": logits}, HERE / "run_v1_expected.safetensors")
    print("wrote", target)
