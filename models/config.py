"""The base of every configuration object: YAML data validated by pydantic, typos are errors."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section: every field has a default and a description; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
