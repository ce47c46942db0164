import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


class RandomDicts(Dataset):
    """mmkit-style dict samples: an ``images`` tensor and a regression target."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"images": self.x[i], "targets": self.y[i]}


class TinyModule(L.LightningModule):
    """Two linear layers; logs the keys mmkit's modules log, so callbacks see realistic metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.log_temperature = nn.Parameter(torch.tensor(0.0))
        self.train_losses = []

    def forward(self, x):
        return self.net(x).squeeze(-1) * self.log_temperature.exp()

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch["images"]), batch["targets"])
        self.train_losses.append(loss.item())
        # on_step + on_epoch makes Lightning add train/loss_step and train/loss_epoch as well.
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        self.log("train/temperature", self.log_temperature.exp())
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        err = (self(batch["images"]) - batch["targets"]).abs()
        self.log("val/i2t_R@1", (err < 0.5).float().mean())
        self.log("val/t2i_R@1", (err < 1.0).float().mean())
        self.log("val/loss", err.pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.fixture
def tiny_fit(tmp_path):
    """Runs a short CPU fit with the given callbacks; returns the trainer."""

    def fit(callbacks, max_steps=10, max_epochs=-1, limit_val_batches=0, logger=False):
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            max_epochs=max_epochs,
            limit_val_batches=limit_val_batches,
            num_sanity_val_steps=0,
            logger=logger,
            callbacks=callbacks,
            default_root_dir=tmp_path,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
        train = DataLoader(RandomDicts(24, seed=0), batch_size=4)
        val = DataLoader(RandomDicts(8, seed=1), batch_size=4)
        trainer.fit(TinyModule(), train, val)
        return trainer  # trainer.lightning_module is the fitted TinyModule

    return fit
