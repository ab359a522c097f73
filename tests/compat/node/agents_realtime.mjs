// `@openai/agents-realtime`: a RealtimeSession over its WebSocket transport, with its default
// session (voice, transcription model, turn detection) and one tool, pointed at the relay's
// GA URL as its docs point it at Azure.
import { RealtimeAgent, RealtimeSession, tool } from '@openai/agents-realtime';
import { z } from 'zod';
import { INSTRUCTIONS, deadline, env, report } from './common.mjs';

deadline(30);
const calls = [];
const getWeather = tool({
  name: 'get_weather',
  description: 'The weather in a city.',
  parameters: z.object({ city: z.string() }),
  execute: async ({ city }) => {
    calls.push(city);
    return `It is sunny in ${city}.`;
  },
});
const agent = new RealtimeAgent({ name: 'Assistant', instructions: INSTRUCTIONS, tools: [getWeather] });
const session = new RealtimeSession(agent, { transport: 'websocket', model: env('RELAY_DEPLOYMENT') });
const seen = [];
const errors = [];
let inForce = null;
let audioBytes = 0;

let finished = false;
const finish = () => {
  if (finished) return;
  finished = true;
  const said = session.history
    .filter((item) => item.type === 'message' && item.role === 'assistant')
    .flatMap((item) => item.content)
    .map((part) => part.transcript ?? part.text ?? '')
    .filter(Boolean);
  report({ session: inForce, seen, errors, calls, audioBytes, said });
  session.close();
};
// An error fails the test at once: report it rather than wait for a reply.
session.on('error', (event) => {
  errors.push(event.error?.error ?? String(event.error));
  finish();
});
session.on('audio', (event) => (audioBytes += event.data.byteLength));
session.on('transport_event', (event) => {
  seen.push(event.type);
  if (event.type === 'session.updated') inForce = event.session;
  if (event.type === 'error') {
    errors.push(event.error ?? event);
    finish();
  } else if (event.type === 'response.done' && calls.length > 0) {
    finish();
  }
});
await session.connect({ apiKey: env('RELAY_KEY'), url: env('RELAY_WS_URL') });
session.sendMessage('What is the weather in Paris? Use get_weather.');
