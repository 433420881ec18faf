"""The Dask layer: mirrored reads, cluster layout, per-worker models, external schedulers."""

import distributed
import numpy as np
import pytest
import torch
import zarr

import segpipe
from segpipe import models
from segpipe.execution import cluster, tasks
from segpipe.execution.cluster import ClusterPlan, plan_local_cluster
from segpipe.geometry.tiling import Box
from segpipe.io.readers import open_image, read_mirrored


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "image.zarr"
    arr = zarr.create_array(
        path, shape=image.shape, chunks=(16, 16, 3), dtype="uint8", dimension_names=("y", "x", "c")
    )
    arr[...] = image
    return open_image(path), image


@pytest.mark.parametrize(
    "box", [Box(-5, 10, -7, 9), Box(30, 45, 40, 70), Box(-40, 80, -60, 110), Box(3, 9, 4, 8)]
)
def test_read_mirrored_equals_numpy_reflect(reader, box):
    r, image = reader
    far = 200
    padded = np.pad(image, ((far, far), (far, far), (0, 0)), mode="reflect")
    expected = padded[box.y0 + far : box.y1 + far, box.x0 + far : box.x1 + far]
    np.testing.assert_array_equal(read_mirrored(r, box), expected)


@pytest.mark.parametrize(
    ("device", "cpus", "gpus", "workers", "expected"),
    [
        ("cpu", 2, 0, None, ClusterPlan(1, 1, 2, 0)),
        ("cpu", 16, 0, None, ClusterPlan(4, 1, 4, 0)),
        ("cpu", 16, 0, 8, ClusterPlan(8, 1, 2, 0)),
        ("cuda", 32, 4, None, ClusterPlan(4, 1, 8, 4)),
    ],
)
def test_cluster_plan(device, cpus, gpus, workers, expected):
    plan = plan_local_cluster(torch.device(device), cpus=cpus, gpus=gpus, n_workers=workers)
    assert plan == expected
    assert plan.resources == ({"GPU": 1} if gpus else {})


def test_connect_rejects_unknown_schedulers():
    with (
        pytest.raises(TypeError, match="scheduler must be"),
        cluster.connect(42, ClusterPlan(1, 1, 1)),
    ):
        pass


def test_model_is_loaded_once_per_process_not_per_tile(reader, tmp_path, monkeypatch):
    r, _ = reader
    built = []
    original = cluster.Predictor.__init__

    def counting(self, *a, **k):
        built.append(1)
        original(self, *a, **k)

    monkeypatch.setattr(cluster.Predictor, "__init__", counting)
    torch.manual_seed(0)
    net = models.build("unet", width=4, depth=2)
    out = segpipe.segment(r, tmp_path / "r.zarr", net, tile=8, task_tiles=1, scheduler="sync")
    assert segpipe.open_result(out).attrs["segpipe"]["tiles_computed"] == 5 * 7
    assert len(built) == 1
    assert tasks._PREDICTORS == {}, "released after the run"


@pytest.mark.integration
def test_existing_scheduler_by_address(reader, tmp_path):
    r, _ = reader
    torch.manual_seed(0)
    net = models.build("unet", width=4, depth=2)
    ref = segpipe.segment(r, tmp_path / "ref.zarr", net, tile=16, scheduler="sync")
    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            resources={"GPU": 1},
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert cluster._gpu_resources(client) == {"GPU": 1}
        out = segpipe.segment(
            r, tmp_path / "r.zarr", net, tile=16, scheduler=cluster.scheduler_address
        )
        # the run cleaned up after itself on the shared cluster
        plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
        assert not any("segpipe" in p for names in plugins.values() for p in names)
    np.testing.assert_array_equal(
        segpipe.open_result(out)["probabilities"].values,
        segpipe.open_result(ref)["probabilities"].values,
    )
