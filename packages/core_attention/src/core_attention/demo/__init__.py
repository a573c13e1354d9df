"""``attn-demo``: one report with a stage per installed app.

An app adds its stage by exposing a :class:`Stage` under the entry-point group
``attn_demo.stages`` in its ``pyproject.toml``::

    [project.entry-points."attn_demo.stages"]
    speech = "attn_speech.demo:STAGE"
"""

from core_attention.demo.stage import Artifact, Stage, StageContext, StageResult

__all__ = ["Artifact", "Stage", "StageContext", "StageResult"]
