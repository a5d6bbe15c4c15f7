"""The design options are the same everywhere: the CLI's choice lists match the data layer, and a job's
typed options (HTTP and gRPC) reach the run's settings under the same names."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from service.cli.choices import AtacChoice, SchemeChoice
from service.data.preprocess import ATAC_TRANSFORMS
from service.data.splits import SCHEMES
from service.jobs import design_settings
from service.protocol import DesignJobRequest, DesignOptions
from service.protocol.jobs import SplitScheme


def test_choice_lists_are_the_data_layers():
    assert [c.value for c in SchemeChoice] == list(SCHEMES) == list(typing.get_args(SplitScheme))
    assert [c.value for c in AtacChoice] == list(ATAC_TRANSFORMS)


def test_job_options_reach_the_run_settings(tmp_path):
    options = DesignOptions(perturbation_key="sgRNA", control="NTC", context_key="leiden_celltype", dose_key="dose_uM",
                            scheme="unseen-context", held_out_context="B_cell", memory="3g", cpus=1.5)
    params = {"dataset_path": str(tmp_path / "d.h5ad"), "task": "predict", "options": options.chosen()}
    settings = design_settings(params, tmp_path / "run")
    assert settings.data_keys() == {"perturbation_key": "sgRNA", "control": "NTC", "context_key": "leiden_celltype",
                                    "dose_key": "dose_uM"}
    assert (settings.scheme, settings.held_out_context, settings.memory, settings.cpus) == (
        "unseen-context", "B_cell", "3g", 1.5)


def test_job_options_refuse_an_unknown_scheme_or_option():
    with pytest.raises(ValidationError, match="scheme"):
        DesignJobRequest.model_validate({"dataset_id": "ds", "task": "t", "options": {"scheme": "unseen-gene"}})
    with pytest.raises(ValidationError, match="context_column"):
        DesignJobRequest.model_validate({"dataset_id": "ds", "task": "t", "options": {"context_column": "x"}})
