"""What a run puts on its workers: the model plugin's name, and which plugins a killed
driver left behind on a shared scheduler."""

from types import SimpleNamespace

import torch

from segpipe.execution.predictor import InferenceConfig
from segpipe.execution.workers import ModelPlugin, orphaned_plugins


def test_orphaned_plugins_are_those_of_clients_gone_and_never_an_ownerless_one():
    """A plugin registered without an owner (a run on a cluster of its own) has no client to
    outlive: it is never an orphan, and it does not stop the others being found."""

    def name(key, owner=None):
        return ModelPlugin(key, torch.nn.Identity(), InferenceConfig(device="cpu"), owner).name

    ownerless, live, gone = name("k1"), name("k2", "Client-live"), name("k3", "Client-gone")
    scheduler = SimpleNamespace(
        worker_plugins=dict.fromkeys([ownerless, live, gone, "other@Client-gone"]),
        clients={"Client-live": object()},
    )
    assert orphaned_plugins(scheduler) == ["segpipe-model-k3@Client-gone"]
