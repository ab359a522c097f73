// The `openai` npm package's Realtime WebSocket client for Azure (`OpenAIRealtimeWS.azure`),
// as its azure.md shows: an AzureOpenAI client, then a GA session on wss://<endpoint>/openai/v1.
import { AzureOpenAI } from 'openai';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';
import { CLIENT_TRANSCRIPTION, INSTRUCTIONS, VOICE, deadline, env, report, toneBase64 } from './common.mjs';

deadline(30);
const client = new AzureOpenAI({
  endpoint: env('RELAY_URL'), // https://127.0.0.1:<port>; NODE_EXTRA_CA_CERTS trusts its CA
  apiKey: env('RELAY_KEY'),
  apiVersion: '2025-08-28',
});
const rt = await OpenAIRealtimeWS.azure(client, { deploymentName: env('RELAY_DEPLOYMENT') });
const seen = [];
const errors = [];
let session = null;
let transcript = '';
let audioChars = 0;

rt.on('event', (event) => seen.push(event.type));
let finished = false;
const finish = (status) => {
  if (finished) return;
  finished = true;
  report({ session, seen, errors, transcript, audioChars, status });
  rt.close();
};
// An error event fails the test at once: report it rather than wait for a reply.
rt.on('error', (err) => {
  errors.push(err.error ?? String(err));
  finish('error');
});
rt.on('response.output_audio.delta', (event) => (audioChars += event.delta.length));
rt.on('response.output_audio_transcript.done', (event) => (transcript = event.transcript));
rt.on('session.updated', (event) => {
  session = event.session;
  rt.send({ type: 'input_audio_buffer.append', audio: toneBase64() });
  rt.send({ type: 'input_audio_buffer.commit' });
  rt.send({ type: 'response.create' });
});
rt.on('response.done', (event) => finish(event.response.status));
rt.socket.on('open', () => {
  rt.send({
    type: 'session.update',
    session: {
      type: 'realtime',
      instructions: INSTRUCTIONS,
      output_modalities: ['audio'],
      audio: {
        input: { transcription: { model: CLIENT_TRANSCRIPTION }, turn_detection: null },
        output: { voice: VOICE },
      },
      max_output_tokens: 'inf',
    },
  });
});
