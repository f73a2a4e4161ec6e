"""Request models of the prediction route, and error messages that never quote the request.

pydantic validates the body (so `/openapi.json` describes it, and fuzzers can generate from it); its errors
are rewritten here into one sentence per rule broken. A message names the instance, the field and the rule,
never a value or a key the client sent, so nothing a client uploads can come back in an error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

from ..inference.postprocess import TTA_MODES
from ..models.diffusion import SCHEDULERS

MASK_FORMATS = ("png_b64", "rle", "none")
GENERATE_LIMIT = 64  # schema bound; the server's --max-generate is checked in the route
MAX_GENERATE_STEPS = 1000
MAX_SEED = 2**31 - 1
MAX_CLASS = 10**6
MAX_MIN_COMPONENT = 10**6  # pixels, larger than any model's input

WholeNumber = Annotated[int, Field(strict=True)]


class B64Instance(BaseModel):
    """An uploaded file: PNG, JPEG, .npy or MATLAB .mat bytes, base64-encoded. `{}` is the empty instance
    of a generate request."""

    model_config = ConfigDict(extra="forbid")
    b64: StrictStr | None = None


Instance = Union[B64Instance, list[Any]]


class Parameters(BaseModel):
    """Prediction options; the generate keys apply only when `generate` is given (a pipeline server)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    threshold: Annotated[float, Field(ge=0.0, le=1.0, strict=True)] = 0.5
    mask_format: Literal[MASK_FORMATS] = "png_b64"  # type: ignore[valid-type]
    return_probabilities: StrictBool = False
    tta: Literal[TTA_MODES] = "none"  # type: ignore[valid-type]
    min_component: Annotated[WholeNumber, Field(ge=0, le=MAX_MIN_COMPONENT)] = 0
    min_peak: Annotated[float, Field(ge=0.0, le=1.0, strict=True)] = 0.0
    generate: Annotated[WholeNumber, Field(ge=1, le=GENERATE_LIMIT)] | None = None
    class_label: Annotated[WholeNumber, Field(ge=0, le=MAX_CLASS)] | None = Field(None, alias="class")
    steps: Annotated[WholeNumber, Field(ge=1, le=MAX_GENERATE_STEPS)] = 20
    seed: Annotated[WholeNumber, Field(ge=0, le=MAX_SEED)] = 0
    scheduler: Literal[tuple(sorted(SCHEDULERS))] = "dpmsolver"  # type: ignore[valid-type]
    guidance: Annotated[float, Field(gt=0.0, le=50.0, strict=True)] = 1.0

    @model_validator(mode="after")
    def _generate_keys_need_generate(self) -> "Parameters":
        generate_only = {"class_label", "steps", "seed", "scheduler", "guidance"} & self.model_fields_set
        if self.generate is None and generate_only:
            raise ValueError("unknown parameter(s) for a segmentation request: class, steps, seed, scheduler and "
                             "guidance apply only to generate requests")
        if self.generate is not None and {"tta", "min_component", "min_peak"} & self.model_fields_set:
            raise ValueError("tta, min_component and min_peak apply only to segmentation requests (instances), not "
                             "to generate requests")
        return self


class PredictRequest(BaseModel):
    """The Vertex AI prediction body: `instances` (one prediction each, same order) and `parameters`."""

    model_config = ConfigDict(extra="forbid")
    instances: list[Instance]
    parameters: Parameters | None = None


def rules(max_generate: int = GENERATE_LIMIT) -> dict[str, str]:
    """The sentence for each parameter's rule; `generate`'s upper bound is the server's --max-generate."""
    return {
        "threshold": "threshold must be a number in [0, 1]",
        "mask_format": f"mask_format must be one of {list(MASK_FORMATS)}",
        "return_probabilities": "return_probabilities must be true or false",
        "tta": f"tta must be one of {list(TTA_MODES)}",
        "min_component": f"min_component must be a whole number of pixels in [0, {MAX_MIN_COMPONENT}]",
        "min_peak": "min_peak must be a number in [0, 1]",
        "generate": f"generate must be a whole number in [1, {max_generate}]",
        "class": f"class must be a whole number in [0, {MAX_CLASS}]",
        "steps": f"steps must be a whole number in [1, {MAX_GENERATE_STEPS}]",
        "seed": f"seed must be a whole number in [0, {MAX_SEED}]",
        "scheduler": f"unknown scheduler; choose one of {sorted(SCHEDULERS)}",
        "guidance": "guidance must be a number in (0, 50]",
    }


INSTANCE_RULE = 'an instance must be {"b64": "<base64 string>"} or a nested list of numbers'


def validation_message(errors: list[dict[str, Any]], max_generate: int = GENERATE_LIMIT) -> tuple[str, int | None]:
    """(message, instance index or None) for the first of pydantic's errors, without the request's values."""
    error = errors[0]
    loc = [part for part in error.get("loc", ()) if part != "body"]
    kind = error.get("type", "")
    if kind == "json_invalid" or not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "malformed JSON: the body must be a JSON object", None
    if loc[:1] == ["instances"]:
        if len(loc) > 1 and isinstance(loc[1], int):
            return INSTANCE_RULE, loc[1]
        return ('"instances" must be a list' if kind != "missing" else 'the body needs an "instances" list'), None
    if loc[:1] == ["parameters"]:
        if len(loc) == 1:
            if kind == "value_error":  # our own model validator: its text holds no request values
                return str(error.get("msg", "")).removeprefix("Value error, "), None
            return '"parameters" must be an object', None
        if kind == "extra_forbidden":
            return f"unknown parameter(s) in \"parameters\"; allowed: {sorted(rules())}", None
        return rules(max_generate).get(str(loc[1]), "invalid parameter"), None
    if kind == "extra_forbidden":
        return 'unknown field in the body: it takes "instances" and "parameters"', None
    return 'the body must be a JSON object with an "instances" list', None
