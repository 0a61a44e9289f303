"""The VLMEvalKit adapter through VLMEvalKit's own inference loop (`infer_data_job`) with the tiny
model: it answers what `vlaflow eval vqa` answers, MMMU's interleaved images and yes-or-no
questions included, and VLMEvalKit's scoring of its prediction file gives vlaflow's table."""

import functools
import importlib
import math
import random
import shutil

import pandas as pd
import pytest

from tests import vlmevalkit
from tests.test_vlmevalkit_parity import mmmu_rows, plain_rows, write_tsv
from tests.test_vlmevalkit_yes_or_no_parity import yes_or_no_rows
from vlaflow.backbone.folder import load_vla
from vlaflow.evaluation import vlmevalkit as adapter
from vlaflow.evaluation.vqa import evaluate_vqa

pytestmark = pytest.mark.slow
# name: (VLMEvalKit's module and dataset class, the kind vlaflow is told)
BENCHMARKS = {
    "AdapterMCQ": ("image_mcq", "ImageMCQDataset", None),
    "MMMU_adapter": ("image_mcq", "MMMUDataset", None),
    "AdapterYesNo": ("image_yorn", "ImageYORNDataset", "yes_or_no"),
}


@pytest.fixture(scope="module")
def model_folder(vla_folder, tmp_path_factory):
    """The tiny model with its experts saved: `vla_folder` leaves them to be initialised at random
    on every load, and the two runs compared here load it separately."""
    folder = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(vla_folder, folder)
    load_vla(vla_folder, dtype="auto").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def both(model_folder, tmp_path_factory):
    lmudata, work = tmp_path_factory.mktemp("LMUData"), tmp_path_factory.mktemp("work")
    rng = random.Random(1)
    write_tsv(lmudata / "AdapterMCQ.tsv", plain_rows(rng, 5, hints=True, splits=("dev", "test")))
    write_tsv(lmudata / "MMMU_adapter.tsv", mmmu_rows(rng, 5))
    write_tsv(lmudata / "AdapterYesNo.tsv", yes_or_no_rows(rng, 5, categories=["color", "shape"]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMUData", str(lmudata))
        kit = vlmevalkit.load()
        # the adapter subclasses VLMEvalKit's BaseModel only where `vlmeval` imports, as it now does
        importlib.reload(adapter)
        assert adapter.VlaflowVLM.__mro__[1] is kit.base.BaseModel
        kit.config.supported_VLM["vlaflow"] = functools.partial(
            adapter.VlaflowVLM, model_path=str(model_folder), max_new_tokens=6
        )
        theirs = {}
        for name, (module, dataset_class, _) in BENCHMARKS.items():
            dataset = getattr(getattr(kit, module), dataset_class)(name)
            kit.inference.infer_data_job("vlaflow", str(work), "vlaflow", dataset)
            table = dataset.evaluate(str(work / f"vlaflow_{name}.xlsx"), model="exact_matching", nproc=1)
            theirs[name] = (pd.read_excel(work / f"vlaflow_{name}.xlsx"), table)
    out = tmp_path_factory.mktemp("eval") / "vqa"
    kinds = {name: kind for name, (_, _, kind) in BENCHMARKS.items() if kind}
    summary = evaluate_vqa(model_folder, list(BENCHMARKS), lmudata, out, batch_size=2, max_new_tokens=6, kinds=kinds)
    ours = {name: pd.read_excel(out / f"{model_folder.name}_{name}.xlsx") for name in BENCHMARKS}
    return theirs, ours, summary


@pytest.mark.parametrize("name", BENCHMARKS)
def test_vlmevalkits_loop_gets_vlaflows_answers(both, name):
    theirs, ours, _ = both
    their_predictions, _ = theirs[name]
    assert len(their_predictions) >= 5
    pd.testing.assert_frame_equal(ours[name], their_predictions)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_vlmevalkits_table_of_its_own_run_is_vlaflows(both, name):
    theirs, _, summary = both
    _, table = theirs[name]
    ours = {row.get("split"): row for row in summary[name]["vlmevalkit"]}
    assert len(ours) == len(table)
    for row in table.to_dict("records"):
        split = row.get("split")
        for column, value in row.items():
            mine = ours[split][str(column)]
            assert (mine is None and math.isnan(value)) or mine == value, f"{name} {split} {column}"
