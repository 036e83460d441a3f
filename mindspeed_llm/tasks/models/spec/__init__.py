"""Layer specs addressable as `--spec mindspeed_llm.tasks.models.spec.<name> layer_spec`."""
