"""Two gloo ranks on 127.0.0.1 evaluate disjoint shards whose reduced confusion matrix equals the
one-process matrix exactly, gather their per-image rows and the report's worst images to rank 0,
and export into one directory without tripping the overwrite check."""

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from eval_helpers import ConvNet, FakeDataset

from segkit import distributed
from segkit.evaluation.loop import evaluate
from segkit.evaluation.mask_export import MaskExporter
from segkit.evaluation.metrics import ConfusionMatrix
from segkit.evaluation.report import WorstImages
from segkit.inference.options import InferenceOptions

NUM_CLASSES = 4
SIZES = [(20, 30), (33, 17), (24, 24), (9, 40), (28, 21)]  # 5 images: shards of 3 and 2
MULTISCALE = InferenceOptions(scales=[0.75, 1.0], flip=True, max_batch=3)


def _run(out_dir, progress):
    """Evaluate, scoring each rank's own images in a second matrix through the callback."""
    ds = FakeDataset(SIZES, NUM_CLASSES, unlabelled={3})
    exporter = MaskExporter(out_dir / "masks", ds)
    own = ConfusionMatrix(NUM_CLASSES)
    seen = []

    def callback(index, image, mask, pred):
        seen.append(index)
        exporter(index, image, mask, pred)
        if mask is not None:
            own.update(torch.from_numpy(pred), torch.from_numpy(mask))

    keeper = WorstImages(2)
    result = evaluate(ConvNet(NUM_CLASSES), ds, MULTISCALE, base_size=32, crop_size=24, callback=callback,
                      num_workers=0, progress=progress, per_image=True, row_callback=keeper)
    del result["seconds"]
    result["worst"] = [(item[0]["index"], item[3].tolist()) for item in keeper.gathered()]  # a collective
    return result, own, seen


def _worker(rank, world_size, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        result, own, seen = _run(out_dir, progress=True)
        shard = own.mat.clone()
        own.reduce_from_all_processes()
        mean = distributed.all_reduce(torch.tensor([rank + 1.0]), average=True)
        torch.save({"result": result, "shard": shard, "reduced": own.mat, "seen": seen,
                    "rank": distributed.get_rank(), "world": distributed.get_world_size(),
                    "mean": mean.item()}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single, single_cm, single_seen = _run(tmp_path / "one", progress=False)
    assert not distributed.is_dist() and single_seen == list(range(len(SIZES)))

    mp.spawn(_worker, args=(2, _free_port(), tmp_path / "two"), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]

    assert [r["seen"] for r in ranks] == [[0, 2, 4], [1, 3]]  # i % world == rank, no repeats
    assert [(r["rank"], r["world"], r["mean"]) for r in ranks] == [(0, 2, 1.5), (1, 2, 1.5)]
    assert torch.equal(ranks[0]["shard"] + ranks[1]["shard"], single_cm.mat)
    # Rank 0 holds every labelled image's row and the worst images of all ranks, the others none.
    assert [row["index"] for row in single["per_image"]] == [0, 1, 2, 4] and len(single["worst"]) == 2
    assert ranks[1]["result"] == {**single, "per_image": [], "worst": []}
    for r in ranks:
        assert torch.equal(r["reduced"], single_cm.mat)
    assert ranks[0]["result"] == single
    assert single["num_images"] == 5
    exported = sorted(p.relative_to(tmp_path / "two" / "masks")
                      for p in (tmp_path / "two" / "masks").rglob("*.png"))
    assert exported == sorted(p.relative_to(tmp_path / "one" / "masks")
                              for p in (tmp_path / "one" / "masks").rglob("*.png"))
    assert len(exported) == 3 * len(SIZES)  # labels, color, overlay
