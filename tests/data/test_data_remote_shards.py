"""WebDataset shards as open_clip users point at them: ``pipe:`` commands and URLs (here a local
HTTP server on 127.0.0.1) give exactly the samples of the same local files, split the same way
over ranks and workers; a failing command or a missing URL is an error naming it when it is the
first shard, a counted skip naming it otherwise."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import tarfile
import threading
import time

import numpy as np
import pytest

from datafakes import make_shards, shard_samples, write_shard_tarfile
from mmkit.data import BadSample, WebDatasetShards
from test_data_shards import _collate, _indices, _read


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; a path with "forbidden" in it answers 403, as a bucket without access does."""

    def do_GET(self) -> None:
        if "forbidden" in self.path:
            self.send_error(403, "Forbidden")
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    """Base URL of an HTTP server on 127.0.0.1 serving ``tmp_path``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def _content(ds):
    """Every item of one pass: good samples as (index, caption, label, pixels), bad ones as reasons."""
    out = []
    for s in ds:
        if isinstance(s, BadSample):
            out.append(s.reason)
        else:
            out.append((s["index"], s["caption"], s["label"], np.asarray(s["image"]).tobytes()))
    return out


def test_pipe_and_http_shards_give_the_samples_of_the_local_files(tmp_path, served):
    make_shards(tmp_path, [3, 4, 2, 5])
    local = WebDatasetShards(str(tmp_path / "shard-{000..003}.tar"), shuffle_shards=False)
    piped = WebDatasetShards(f"pipe:cat {tmp_path}/shard-{{000..003}}.tar", shuffle_shards=False)
    fetched = WebDatasetShards(f"{served}/shard-{{000..003}}.tar", shuffle_shards=False)
    # webdataset's "::" list, mixing a file:// URL, a command and web URLs in one source
    mixed = WebDatasetShards(f"file://{tmp_path}/shard-000.tar::pipe:cat {tmp_path}/shard-001.tar::{served}/shard-{{002..003}}.tar",
                             shuffle_shards=False)
    expected = _content(local)
    assert len(expected) == 14 and not any(isinstance(x, str) for x in expected)
    assert _content(piped) == expected
    assert _content(fetched) == expected
    assert _content(mixed) == expected
    assert [p for _, _, p in fetched.shards] == [f"{served}/shard-{i:03d}.tar" for i in range(4)]  # expanded, not globbed

    # Split over 2 ranks x 2 worker processes (which open the streams): the same batches as local files.
    for remote in (f"pipe:cat {tmp_path}/shard-{{000..003}}.tar", f"{served}/shard-{{000..003}}.tar"):
        ds = WebDatasetShards(remote, seed=5)
        ref = WebDatasetShards(str(tmp_path / "shard-{000..003}.tar"), seed=5)
        for rank in (0, 1):
            assert _indices(_read(ds, rank, 2, workers=2, epoch=1)) == _indices(_read(ref, rank, 2, workers=2, epoch=1))


def test_gzipped_shard_streams_through_a_pipe(tmp_path):
    write_shard_tarfile(tmp_path / "plain.tar", shard_samples(0, 3))
    with tarfile.open(tmp_path / "plain.tar") as src, tarfile.open(tmp_path / "z.tar.gz", "w:gz") as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member))
    assert _content(WebDatasetShards(f"pipe:cat {tmp_path}/z.tar.gz")) == _content(WebDatasetShards(str(tmp_path / "plain.tar")))


def test_a_failing_first_command_is_an_error_naming_it_and_its_error_output(tmp_path):
    # 200 kB on stderr: more than a pipe holds, so a reader that did not drain it would hang here
    command = "(yes retrying | head -c 200000; echo; echo 'bucket my-data does not exist') >&2; exit 3"
    started = time.monotonic()
    with pytest.raises(FileNotFoundError) as e:
        WebDatasetShards(f"pipe:{command}")
    message = str(e.value)
    assert "no shard found" in message and f"pipe command {command!r} exited with status 3" in message
    assert message.endswith("bucket my-data does not exist)") and len(message) < 2000  # the end of stderr
    assert time.monotonic() - started < 30


def test_a_command_failing_mid_shard_is_skipped_naming_it(tmp_path):
    make_shards(tmp_path, [3, 4])
    with tarfile.open(tmp_path / "shard-001.tar") as t:
        cut = t.getmember("0010002.jpg").offset_data  # the stream breaks inside the third sample
    broken = f"head -c {cut} {tmp_path}/shard-001.tar; echo 'connection reset by peer' >&2; exit 56"
    ds = WebDatasetShards(f"pipe:cat {tmp_path}/shard-000.tar::pipe:{broken}", shuffle_shards=False)
    items = list(ds)
    good = [s["index"] for s in items if not isinstance(s, BadSample)]
    bad = [s for s in items if isinstance(s, BadSample)]
    assert good == [0, 1, 2, 1_000_000, 1_000_001]
    assert len(bad) == 1 and bad[0].index == 1_000_002
    assert f"pipe:{broken} sample '0010002' (#2): cannot be read" in bad[0].reason
    assert "PipeCommandError" in bad[0].reason and "exited with status 56" in bad[0].reason
    assert bad[0].reason.rstrip(")").endswith("connection reset by peer")
    batch = _collate()(items)
    assert batch["num_skipped"] == 1 and batch["skipped_index"] == [1_000_002]


def test_a_stream_cut_at_a_block_boundary_is_counted(tmp_path):
    """The end-of-archive check works on streams too (no seeking): ``head`` cuts the tar between two
    samples, exactly at a header, and exits 0."""
    write_shard_tarfile(tmp_path / "whole.tar", shard_samples(0, 4))
    with tarfile.open(tmp_path / "whole.tar") as t:
        cut = min(m.offset for m in t.getmembers() if m.name.startswith("0000002."))
    items = list(WebDatasetShards(f"pipe:head -c {cut} {tmp_path}/whole.tar"))
    assert [s["index"] for s in items if not isinstance(s, BadSample)] == [0, 1]
    (bad,) = [s for s in items if isinstance(s, BadSample)]
    assert "without tar's end-of-archive blocks" in bad.reason and bad.index == 2


def test_a_shard_left_early_stops_its_command(tmp_path):
    make_shards(tmp_path, [6, 6])
    marker = tmp_path / "still-running"
    ds = WebDatasetShards(f"pipe:cat {tmp_path}/shard-{{000..001}}.tar; sleep 1; touch {marker}",
                          samples_per_epoch=2, shuffle_shards=False)
    ds.set_distributed(0, 1)
    assert len(list(ds)) == 2  # the quota ends the pass inside the first shard
    time.sleep(2)
    assert not marker.exists()  # the command and what it started were stopped, not left to run


def test_missing_or_forbidden_urls_first_is_an_error_later_a_counted_skip(tmp_path, served):
    make_shards(tmp_path, [2])
    with pytest.raises(FileNotFoundError, match=rf"no shard found .*{served}/nope-000.tar"):
        WebDatasetShards(f"{served}/nope-{{000..001}}.tar")
    with pytest.raises(FileNotFoundError, match=rf"no shard found .*{served}/forbidden-000.tar.*403"):
        WebDatasetShards(f"{served}/forbidden-{{000..001}}.tar")
    items = list(WebDatasetShards(f"{served}/shard-{{000..001}}.tar::{served}/forbidden.tar", shuffle_shards=False))
    assert [s["index"] for s in items[:2]] == [0, 1]
    assert all(isinstance(s, BadSample) for s in items[2:]) and [s.index for s in items[2:]] == [1_000_000, 2_000_000]
    assert f"{served}/shard-001.tar shard: cannot be read" in items[2].reason and "FileNotFoundError" in items[2].reason
    assert f"{served}/forbidden.tar shard: cannot be read" in items[3].reason and "403" in items[3].reason


@pytest.mark.parametrize(("url", "package", "extra"), [("s3://bucket/train-{000..009}.tar", "s3fs", "s3"),
                                                       ("gs://bucket/train-{000..009}.tar", "gcsfs", "gcs")])
def test_cloud_urls_without_their_package_say_what_to_install(url, package, extra):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(ImportError, match=rf"pip install {package} \(or pip install 'mmkit\[{extra}\]'\)"):
        WebDatasetShards(url)


def test_unknown_url_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="fsspec knows no protocol 'nosuch'"):
        WebDatasetShards("nosuch://bucket/train-{000..009}.tar")


@pytest.mark.slow
def test_cluster_recipe_trains_from_http_shards(tmp_path, served):
    """The WebDataset recipe as a user runs it, its shard list pointing at a web server: the
    first steps train. (One CPU process and the tiny preset for the test budget.)"""
    from user_runs import MMKIT, RECIPES, run_to_exit

    make_shards(tmp_path, [8, 8, 8])
    make_shards(tmp_path / "cc", [8], prefix="cc")
    images = tmp_path / "val"
    images.mkdir()
    from datafakes import write_csv, write_images

    write_images(images, [f"{i}.jpg" for i in range(4)])
    write_csv(images / "val.csv", [{"image": f"{i}.jpg", "caption": f"picture {i}"} for i in range(4)])
    urls = [f"{served}/shard-{{000..002}}.tar", f"pipe:cat {tmp_path}/cc/cc-000.tar"]
    out = run_to_exit([MMKIT, "fit", "--config", str(RECIPES / "webdataset_vitb32_ddp.yaml"),
                       "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                       "--trainer.precision", "32-true", "--model.init_args.model.init_args.arch", "mmkit-tiny",
                       "--data.init_args.train.init_args.urls", json.dumps(urls),
                       "--data.init_args.train.init_args.samples_per_epoch", "16",
                       "--data.init_args.train.init_args.shuffle_buffer", "4",
                       "--data.init_args.val.init_args.path", str(images / "val.csv"),
                       "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
                       "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "runs/http",
                       "--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "4",
                       "--data.init_args.num_workers", "2"],
                      cwd=tmp_path, timeout=400)
    assert "skipped" not in out
    metrics = (tmp_path / "runs" / "http" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/i2t_R@1" in metrics
    assert (tmp_path / "runs" / "http" / "export" / "open_clip_model.safetensors").is_file()
