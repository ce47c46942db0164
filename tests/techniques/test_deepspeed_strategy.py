"""mmkit's ``DeepSpeedStrategy`` without processes: its names, the refusal of Lightning's own class
for mmkit's modules, the config it completes from the module, and ``configure_model`` outside
``deepspeed.zero.Init``. Runs that train under it: ``test_deepspeed.py``, ``test_deepspeed_modules.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed: pip install -e '.[dev]'")

ARCH = str(Path(__file__).resolve().parent.parent / "models" / "tiny_test_arch.json")


def _module(**kwargs):
    from mmkit import CLIPPretrain
    from mmkit.models import OpenCLIP

    return CLIPPretrain(OpenCLIP(ARCH), export_dir="", **kwargs)


def _trainer(strategy):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)


def test_registered_under_lightnings_names_with_a_prefix():
    from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
    from lightning.pytorch.strategies import StrategyRegistry

    from mmkit.parallel.deepspeed_strategy import DeepSpeedStrategy

    lightnings = {n: e for n, e in StrategyRegistry.items() if e["strategy"] is LightningDeepSpeedStrategy}
    assert {"deepspeed", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload"} <= set(lightnings)
    for name, entry in lightnings.items():  # the same settings; Lightning's own names untouched
        assert StrategyRegistry["mmkit_" + name]["strategy"] is DeepSpeedStrategy
        assert StrategyRegistry["mmkit_" + name]["init_params"] == entry["init_params"]
    strategy = StrategyRegistry.get("mmkit_deepspeed_stage_3")
    assert type(strategy) is DeepSpeedStrategy and strategy.zero_stage_3


def test_mmkit_modules_refuse_lightnings_own_class():
    from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy

    module = _module()
    module.trainer = _trainer(LightningDeepSpeedStrategy(stage=3))
    with pytest.raises(TypeError, match=r"mmkit.parallel.deepspeed_strategy.DeepSpeedStrategy \(e.g. strategy: "
                                        r"mmkit_deepspeed_stage_3,.*not lightning.pytorch.strategies.deepspeed.DeepSpeedStrategy"):
        module.setup("fit")


def test_config_takes_the_modules_clipping_and_the_data_batch_size():
    from deepspeed_cpu import CPUDeepSpeedStrategy

    from mmkit.data import ImageTextDataModule, SyntheticShapes

    def completed(config, grad_clip_norm):
        module = _module(grad_clip_norm=grad_clip_norm)
        trainer = _trainer(CPUDeepSpeedStrategy(config=config))
        module.trainer = trainer
        trainer.strategy.connect(module)
        trainer._data_connector.attach_datamodule(module, ImageTextDataModule(SyntheticShapes(size=8), batch_size=6))
        module.setup("fit")  # mmkit's strategy: accepted
        trainer.strategy._config_from_module()  # what its setup does first
        return trainer.strategy.config

    config = completed({"zero_optimization": {"stage": 2}}, 0.5)
    assert config["gradient_clipping"] == 0.5 and config["train_micro_batch_size_per_gpu"] == 6
    assert completed({"zero_optimization": {"stage": 2}}, None)["gradient_clipping"] == 0.0
    assert completed({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}, 0.5)["gradient_clipping"] == 0.5
    with pytest.raises(ValueError, match=r"gradient_clipping=1.0 but the module has grad_clip_norm=0.5: remove"):
        completed({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}, 0.5)


def test_model_is_built_whole_under_zero3():
    from deepspeed_cpu import CPUDeepSpeedStrategy

    module = _module()
    strategy = CPUDeepSpeedStrategy(stage=3)
    with strategy.model_sharded_context():  # Lightning's opens deepspeed.zero.Init here
        module.configure_model()
    assert not any(hasattr(p, "ds_id") for p in module.parameters())
    assert module.model.log_scale_parameter().numel() == 1


def test_the_0dim_patch_of_deepspeed_holds_only_while_an_engine_is_built():
    import deepspeed_cpu  # noqa: F401  (DeepSpeed's CPU accelerator, before deepspeed is imported)
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    from mmkit.parallel.deepspeed_strategy import broadcastable_0dim_params

    def current():
        return DeepSpeedEngine._broadcast_model, Init._zero_init_param

    originals = current()
    with broadcastable_0dim_params():
        patched = current()
        assert patched[0] is not originals[0] and patched[1] is not originals[1]
        with broadcastable_0dim_params():  # nested: the same patch, undone only by the outer one
            assert current() == patched
        assert current() == patched
    assert current() == originals
