// Runs on the audio thread: turns the microphone (any rate, any channel count) into 24 kHz
// mono PCM16 and posts it to the page 40 ms at a time.
const OUT_RATE = 24000;
const CHUNK = OUT_RATE / 25; // 40 ms

class Pcm16Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / OUT_RATE; // input samples per output sample
    this.width = Math.max(1, Math.round(this.step)); // box filter against aliasing
    this.history = new Float32Array(this.width);
    this.slot = 0;
    this.at = 0; // where the next output sample is read, in this block's input samples
    this.previous = 0; // the last filtered input sample of the previous block
    this.chunk = new Int16Array(CHUNK);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const frames = channels[0].length;
    const filtered = new Float32Array(frames);
    for (let i = 0; i < frames; i++) {
      let mono = 0;
      for (const channel of channels) mono += channel[i];
      this.history[this.slot] = mono / channels.length;
      this.slot = (this.slot + 1) % this.width;
      let sum = 0;
      for (const value of this.history) sum += value;
      filtered[i] = sum / this.width;
    }
    // Linear interpolation; index -1 is the previous block's last sample.
    while (this.at < frames - 1) {
      const i = Math.floor(this.at);
      const a = i < 0 ? this.previous : filtered[i];
      const b = filtered[i + 1];
      this.push(a + (b - a) * (this.at - i));
      this.at += this.step;
    }
    this.at -= frames;
    this.previous = filtered[frames - 1];
    return true;
  }

  push(sample) {
    const clipped = Math.max(-1, Math.min(1, sample));
    this.chunk[this.filled++] = clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff;
    if (this.filled === CHUNK) {
      this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
      this.chunk = new Int16Array(CHUNK);
      this.filled = 0;
    }
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
