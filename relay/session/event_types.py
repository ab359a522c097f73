"""The realtime API's event type names (GA, plus the preview/beta renames), from the SDK."""

from __future__ import annotations

CLIENT_EVENT_TYPES = frozenset(
    {
        "conversation.item.create", "conversation.item.delete", "conversation.item.retrieve",
        "conversation.item.truncate", "input_audio_buffer.append", "input_audio_buffer.clear",
        "input_audio_buffer.commit", "output_audio_buffer.clear", "response.cancel",
        "response.create", "session.update",
    }
)  # fmt: skip
PREVIEW_CLIENT_EVENT_TYPES = frozenset({"transcription_session.update"})

SERVER_EVENT_TYPES = frozenset(
    {
        "conversation.created", "conversation.item.added", "conversation.item.created",
        "conversation.item.deleted", "conversation.item.done",
        "conversation.item.input_audio_transcription.completed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.failed",
        "conversation.item.input_audio_transcription.segment", "conversation.item.retrieved",
        "conversation.item.truncated", "error", "input_audio_buffer.cleared",
        "input_audio_buffer.committed", "input_audio_buffer.dtmf_event_received",
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
        "input_audio_buffer.timeout_triggered", "mcp_list_tools.completed",
        "mcp_list_tools.failed", "mcp_list_tools.in_progress", "output_audio_buffer.cleared",
        "output_audio_buffer.started", "output_audio_buffer.stopped", "rate_limits.updated",
        "response.content_part.added", "response.content_part.done", "response.created",
        "response.done", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.mcp_call.completed",
        "response.mcp_call.failed", "response.mcp_call.in_progress",
        "response.mcp_call_arguments.delta", "response.mcp_call_arguments.done",
        "response.output_audio.delta", "response.output_audio.done",
        "response.output_audio_transcript.delta", "response.output_audio_transcript.done",
        "response.output_item.added", "response.output_item.done",
        "response.output_text.delta", "response.output_text.done", "session.created",
        "session.updated",
    }
)  # fmt: skip
PREVIEW_SERVER_EVENT_TYPES = frozenset(
    {
        "response.audio.delta", "response.audio.done", "response.audio_transcript.delta",
        "response.audio_transcript.done", "response.text.delta", "response.text.done",
        "transcription_session.created", "transcription_session.updated",
    }
)  # fmt: skip

KNOWN_EVENT_TYPES = (
    CLIENT_EVENT_TYPES
    | PREVIEW_CLIENT_EVENT_TYPES
    | SERVER_EVENT_TYPES
    | PREVIEW_SERVER_EVENT_TYPES
)
AUDIO_DELTA_TYPES = frozenset({"response.output_audio.delta", "response.audio.delta"})
