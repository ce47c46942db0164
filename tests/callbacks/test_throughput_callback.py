import pytest
import torch

from mmkit.callbacks.throughput import Throughput, batch_size_of


class FakeModule:
    def __init__(self):
        self.logged = []

    def log(self, name, value, **kwargs):
        self.logged.append((name, value))


class FakeTrainer:
    world_size = 2
    log_every_n_steps = 1  # every step is a logged one (mmkit.training.log_cadence)
    global_step = 0
    callbacks = ()


def test_rolling_window_skips_warmup_and_validation_gaps():
    cb = Throughput(window=2, warmup=1)
    times = iter([0.0, 1.0, 2.0, 4.0, 5.0, 5.5, 95.5, 96.5])
    cb._clock = lambda: next(times)
    module, trainer, batch = FakeModule(), FakeTrainer(), {"images": torch.zeros(4, 3)}
    cb.on_train_epoch_start(trainer, module)

    def step():
        module.logged.clear()
        cb.on_train_batch_end(trainer, module, None, batch, 0)
        return dict(module.logged)

    assert step() == {}  # t=0: warm-up
    assert step() == {}  # t=1: opens the window
    # 4 rows × 2 ranks over 1 s.
    assert step() == {"train/samples_per_sec": 8.0, "train/step_time": 1.0}
    assert step() == pytest.approx({"train/samples_per_sec": 16 / 3, "train/step_time": 1.5})
    # The window holds the last 2 batches only: ends at 2, 4, 5.
    assert step() == pytest.approx({"train/samples_per_sec": 16 / 3, "train/step_time": 1.5})
    cb.on_validation_start(trainer, module)  # t=5.5
    cb.on_validation_end(trainer, module)  # t=95.5: 90 s of validation
    # t=96.5: the validation gap is not counted, and the window is still full (ends 4, 5, 6.5 net).
    assert step() == pytest.approx({"train/samples_per_sec": 16 / 2.5, "train/step_time": 1.25})


def test_batch_size_of():
    assert batch_size_of({"images": torch.zeros(5, 3), "texts": torch.zeros(7)}) == 5
    assert batch_size_of((torch.zeros(6, 2), torch.zeros(6))) == 6
    assert batch_size_of(torch.zeros(3)) == 3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_logs_positive_throughput_in_a_real_fit(tiny_fit):
    trainer = tiny_fit([Throughput(window=4, warmup=2)], max_steps=10)
    metrics = trainer.callback_metrics
    assert metrics["train/samples_per_sec"] > 0
    assert 0 < metrics["train/step_time"] < 10
