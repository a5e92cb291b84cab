"""The client's wire models mirror the server's schemas field for field, so a change on
one side that the other lacks fails here rather than in a user's hands."""

from __future__ import annotations

import pytest
from fastadapt_client import models as client
from pydantic import BaseModel

from service.api import schemas as server

PAIRS = [
    (client.SupportSet, server.SupportSet),
    (client.AdaptRequest, server.AdaptRequest),
    (client.ReadaptRequest, server.ReadaptRequest),
    (client.PredictionRequest, server.PredictionRequest),
    (client.AdaptResponse, server.AdaptResponse),
    (client.ClassPrediction, server.ClassPrediction),
    (client.PredictionResponse, server.PredictionResponse),
    (client.VersionResponse, server.VersionResponse),
    (client.ClientResponse, server.ClientResponse),
    (client.ClientSummary, server.ClientSummary),
    (client.ClientList, server.ClientList),
    (client.VersionList, server.VersionList),
    (client.RollbackRequest, server.RollbackRequest),
    (client.ExamplesRequest, server.ExamplesRequest),
    (client.MetaModelResponse, server.MetaModelResponse),
    (client.MetaModelList, server.MetaModelList),
    (client.ErrorResponse, server.ErrorResponse),
    (client.BulkPredictionItem, server.BulkPredictionItem),
    (client.BulkPredictionRequest, server.BulkPredictionRequest),
    (client.BulkAdaptationItem, server.BulkAdaptationItem),
    (client.BulkAdaptationRequest, server.BulkAdaptationRequest),
    (client.BulkItemError, server.BulkItemError),
    (client.BulkItemFailure, server.BulkItemFailure),
    (client.BulkPredictionResponse, server.BulkPredictionResponse),
    (client.BulkAdaptationResponse, server.BulkAdaptationResponse),
]


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=lambda m: m.__name__)
def test_the_fields_agree(mine: type[BaseModel], theirs: type[BaseModel]) -> None:
    assert set(mine.model_fields) == set(theirs.model_fields)
    for name, field in theirs.model_fields.items():  # optional on one side: on both
        assert mine.model_fields[name].is_required() == field.is_required(), name


def test_the_error_detail_reads_the_request_id_when_there_is_one() -> None:
    assert set(server.ErrorDetail.model_fields) <= set(client.ErrorDetail.model_fields)
    assert not client.ErrorDetail.model_fields["request_id"].is_required()
