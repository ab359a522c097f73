// What every compat client asks for and reports; tests/compat/test_node_clients.py judges it.
// Each script prints one JSON line: the session in force, the events seen, the errors.

export const INSTRUCTIONS = 'Answer in one short sentence.';
export const VOICE = 'marin';
export const CLIENT_TRANSCRIPTION = 'gpt-4o-mini-transcribe';

/** 600 ms of a 24 kHz PCM16 tone, base64: loud enough to count as speech. */
export function toneBase64(ms = 600) {
  const samples = 24 * ms;
  const pcm = Buffer.alloc(samples * 2);
  for (let i = 0; i < samples; i++) {
    pcm.writeInt16LE(Math.round(8000 * Math.sin((2 * Math.PI * 440 * i) / 24000)), i * 2);
  }
  return pcm.toString('base64');
}

export function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

/** Fail the script (and the test) if it has not finished in time. */
export function deadline(seconds) {
  return setTimeout(() => {
    console.error(`timed out after ${seconds} s`);
    process.exit(3);
  }, seconds * 1000).unref();
}

export function report(result) {
  process.stdout.write(JSON.stringify(result) + '\n');
}
