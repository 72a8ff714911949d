"""The Cancel button on a run's status message and the Retry button on its answer.

Both are ``DynamicItem``s: the run id travels in the button's custom id (``hg:cancel:<run>``,
``hg:retry:<run>``), and the bot registers the two templates at start-up (``add_dynamic_items``), so a button
sent before a restart still reaches its handler afterwards. Only the person who made the request and
administrators may press them. A button that no longer applies (the run ended, or the conversation was reset)
disables itself when pressed; the status message's Cancel is disabled as soon as the run ends.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, ClassVar, Self

import discord

if TYPE_CHECKING:
    from .app import HuggingGPTBot

__all__ = ["CancelButton", "RetryButton", "controls"]

log = logging.getLogger(__name__)

_RUN_ID = r"(?P<run>[a-z0-9]{1,40})"
NOT_YOURS = "Only the person who asked, or an administrator, can do that."


def controls(*items: discord.ui.Item[Any]) -> discord.ui.View:
    """A view of ``items`` that never times out (the buttons stay usable for as long as they apply)."""
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    return view


class _RunButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=rf"hg:run:{_RUN_ID}"):
    """A button about one run; its custom id ``hg:<action>:<run id>`` carries the run across restarts. Each
    subclass names its action in its own ``template`` (what ``add_dynamic_items`` matches) and ``action``."""

    action: ClassVar[str]
    label: ClassVar[str]
    emoji: ClassVar[str]
    style: ClassVar[discord.ButtonStyle]

    def __init__(self, run_id: str, *, disabled: bool = False) -> None:
        super().__init__(
            discord.ui.Button(
                label=self.label,
                emoji=self.emoji,
                style=self.style,
                custom_id=f"hg:{self.action}:{run_id}",
                disabled=disabled,
            )
        )
        self.run_id = run_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(match["run"])


class CancelButton(_RunButton, template=rf"hg:cancel:{_RUN_ID}"):
    action, label, emoji, style = "cancel", "Cancel", "⏹️", discord.ButtonStyle.danger

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        bot: HuggingGPTBot = interaction.client
        await bot.cancel_from_button(interaction, self.run_id)


class RetryButton(_RunButton, template=rf"hg:retry:{_RUN_ID}"):
    action, label, emoji, style = "retry", "Retry", "🔁", discord.ButtonStyle.secondary

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        bot: HuggingGPTBot = interaction.client
        await bot.retry_from_button(interaction, self.run_id)
