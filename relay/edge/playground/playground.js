// The relay playground: one WebSocket to the relay (the key as the browser subprotocol), the
// microphone or a WAV file in as 24 kHz PCM16, the reply's audio played as it streams.
// The key is kept in memory only: never in storage, cookies or the URL.

const RATE = 24000;
const CHUNK_SAMPLES = RATE / 25; // 40 ms
const TRAILING_SILENCE_MS = 1200; // lets server VAD hear the end of a file's speech
const PROBE_EVERY_MS = 2000;
// Probes keep the session from its idle timeout: they stop while the page is hidden and
// once nobody has used it for this long, so a forgotten tab does not hold its slot.
const PROBE_UNTIL_IDLE_MS = 5 * 60 * 1000;
// A probe unanswered this long: the relay (or what is behind it) has stopped answering.
const PROBE_LATE_MS = 10000;
const PLOT_POINTS = 30;
const LOG_ROWS = 300;

const $ = (id) => document.getElementById(id);

let session = null;

// --- audio helpers -----------------------------------------------------------------------

function base64FromBytes(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function pcm16FromBase64(text) {
  const binary = atob(text);
  const samples = new Int16Array(binary.length >> 1);
  for (let i = 0; i < samples.length; i++) {
    const value = binary.charCodeAt(2 * i) | (binary.charCodeAt(2 * i + 1) << 8);
    samples[i] = value >= 0x8000 ? value - 0x10000 : value;
  }
  return samples;
}

function pcm16FromFloat(floats) {
  const out = new Int16Array(floats.length);
  for (let i = 0; i < floats.length; i++) {
    const s = Math.max(-1, Math.min(1, floats[i]));
    out[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
  }
  return out;
}

// Plays PCM16 chunks back to back as they arrive; an interruption drops what is queued.
class Player {
  constructor(onPlayed) {
    this.context = new AudioContext({ sampleRate: RATE });
    this.next = 0;
    this.sources = new Set();
    this.onPlayed = onPlayed;
  }

  play(samples) {
    const floats = new Float32Array(samples.length);
    for (let i = 0; i < samples.length; i++) floats[i] = samples[i] / 0x8000;
    const buffer = this.context.createBuffer(1, floats.length, RATE);
    buffer.copyToChannel(floats, 0);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    const at = Math.max(this.context.currentTime + 0.03, this.next);
    source.start(at);
    this.next = at + buffer.duration;
    this.sources.add(source);
    source.onended = () => {
      if (this.sources.delete(source)) this.onPlayed();
    };
  }

  interrupt() {
    for (const source of this.sources) source.stop();
    this.sources.clear();
    this.next = 0;
  }

  close() {
    this.sources.clear();
    this.context.close();
  }
}

// --- the page's view ---------------------------------------------------------------------

const view = {
  status(text, state) {
    const el = $("status");
    el.textContent = text;
    el.dataset.state = state;
  },
  error(text) {
    const el = $("error");
    el.textContent = text;
    el.hidden = !text;
  },
  connected(on) {
    $("connect").disabled = on;
    $("disconnect").disabled = !on;
    $("mic").disabled = !on;
    $("wav").disabled = !on;
    $("wav-label").dataset.disabled = String(!on);
    if (!on) $("mic").textContent = "Start microphone";
  },
  counters(c) {
    Object.assign($("counters").dataset, c); // for tests: data-played="3"
    $("counters").textContent =
      `audio chunks sent ${c.sent} · received ${c.received} · played ${c.played}`;
  },
  // Audio and deltas come dozens a second, both ways: one row per run of each, with a count.
  runs: new Map(),
  log(direction, event) {
    const list = $("log");
    const type = event.type || "(no type)";
    const audio = type === "input_audio_buffer.append" || type.endsWith(".delta");
    const run = this.runs.get(`${direction} ${type}`);
    if (audio && run) {
      run.count += 1;
      run.row.textContent = `${run.text} ×${run.count}`;
      return;
    }
    if (!audio) this.runs.clear();
    const row = document.createElement("li");
    row.className = type === "error" ? "error" : direction;
    const time = new Date().toISOString().slice(11, 23);
    let text = `${time} ${direction === "out" ? "→" : "←"} ${type}`;
    if (type === "error" && event.error) text += ` ${event.error.code}: ${event.error.message}`;
    row.textContent = text;
    list.append(row);
    while (list.children.length > LOG_ROWS) list.firstChild.remove();
    list.scrollTop = list.scrollHeight;
    if (audio) this.runs.set(`${direction} ${type}`, { row, text, count: 1 });
  },
  transcriptLine(role, key) {
    const list = $("transcript");
    let row = list.querySelector(`li[data-key="${CSS.escape(key)}"]`);
    if (!row) {
      row = document.createElement("li");
      row.className = role;
      row.dataset.key = key;
      list.append(row);
      list.scrollTop = list.scrollHeight;
    }
    return row;
  },
  appendTranscript(role, key, delta) {
    this.transcriptLine(role, key).textContent += delta;
  },
  setTranscript(role, key, text) {
    this.transcriptLine(role, key).textContent = text;
  },
};

// Time to first audio per response, and probe round trips, on one canvas.
const plot = {
  ttfa: [],
  rtt: [],
  add(series, ms) {
    series.push(ms);
    if (series.length > PLOT_POINTS) series.shift();
    this.draw();
  },
  draw() {
    const canvas = $("plot");
    Object.assign(canvas.dataset, { ttfa: this.ttfa.length, rtt: this.rtt.length });
    const g = canvas.getContext("2d");
    const { width, height } = canvas;
    const left = 44, bottom = 22, top = 10;
    g.clearRect(0, 0, width, height);
    const top_ms = Math.max(100, ...this.ttfa, ...this.rtt) * 1.15;
    g.strokeStyle = "#dde2e8";
    g.fillStyle = "#6b7886";
    g.font = "11px system-ui, sans-serif";
    for (let i = 0; i <= 4; i++) {
      const y = top + ((height - top - bottom) * i) / 4;
      g.beginPath();
      g.moveTo(left, y);
      g.lineTo(width, y);
      g.stroke();
      g.fillText(`${Math.round(top_ms * (1 - i / 4))} ms`, 2, y + 4);
    }
    g.fillText(`last ${PLOT_POINTS} samples →`, left, height - 6);
    const series = (values, color) => {
      g.strokeStyle = g.fillStyle = color;
      g.lineWidth = 2;
      g.beginPath();
      values.forEach((ms, i) => {
        const x = left + 6 + ((width - left - 12) * i) / (PLOT_POINTS - 1);
        const y = top + (height - top - bottom) * (1 - ms / top_ms);
        if (i === 0) g.moveTo(x, y);
        else g.lineTo(x, y);
        g.fillRect(x - 2.5, y - 2.5, 5, 5);
      });
      g.stroke();
    };
    series(this.rtt, "#2e6bd1");
    series(this.ttfa, "#e07b00");
  },
};

// --- one connection ----------------------------------------------------------------------

class Session {
  constructor(key, deployment) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/openai/v1/realtime?model=${encodeURIComponent(deployment)}`;
    // Throws a SyntaxError for a key that a subprotocol cannot carry.
    this.ws = new WebSocket(url, ["realtime", `openai-insecure-api-key.${key}`]);
    this.counters = { sent: 0, received: 0, played: 0 };
    this.player = new Player(() => {
      this.counters.played += 1;
      view.counters(this.counters);
    });
    this.opened = false;
    this.started = false;
    this.refusal = null; // the relay's `error` event, when it refused us
    this.serverVad = true;
    this.turnEndedAt = null;
    this.firstAudioSeen = new Set();
    this.probes = [];
    this.probeTimer = null;
    this.lastUsedAt = performance.now();
    this.late = false; // a probe went unanswered too long
    this.microphone = null;
    this.ws.onopen = () => {
      this.opened = true;
    };
    this.ws.onmessage = (message) => this.receive(JSON.parse(message.data));
    this.ws.onclose = (close) => this.closed(close);
    this.ws.onerror = () => {};
  }

  send(event) {
    if (this.ws.readyState !== WebSocket.OPEN) return;
    this.ws.send(JSON.stringify(event));
    if (event.type === "input_audio_buffer.append") {
      this.counters.sent += 1;
      view.counters(this.counters);
    }
    if (!event.event_id || !event.event_id.startsWith("probe_")) {
      view.log("out", event);
      this.lastUsedAt = performance.now();
    }
  }

  appendAudio(samples) {
    this.send({
      type: "input_audio_buffer.append",
      audio: base64FromBytes(new Uint8Array(samples.buffer, samples.byteOffset, samples.byteLength)),
    });
  }

  receive(event) {
    const isProbeReply = event.type === "session.updated" && this.probes.length > 0;
    if (!isProbeReply) view.log("in", event);
    switch (event.type) {
      case "session.created":
        this.started = true;
        this.serverVad = Boolean(event.session?.audio?.input?.turn_detection);
        view.status("connected", "connected");
        view.connected(true);
        this.probeTimer = setInterval(() => this.probe(), PROBE_EVERY_MS);
        break;
      case "session.updated":
        if (isProbeReply) this.probeAnswered();
        else this.serverVad = Boolean(event.session?.audio?.input?.turn_detection);
        break;
      case "input_audio_buffer.speech_started":
        this.player.interrupt(); // the user talks over the reply
        break;
      case "input_audio_buffer.speech_stopped":
      case "input_audio_buffer.committed":
        this.turnEndedAt ??= performance.now();
        break;
      case "conversation.item.input_audio_transcription.delta":
        view.appendTranscript("user", event.item_id, event.delta);
        break;
      case "conversation.item.input_audio_transcription.completed":
        view.setTranscript("user", event.item_id, event.transcript);
        break;
      case "response.output_audio.delta":
      case "response.audio.delta":
        this.audio(event);
        break;
      case "response.output_audio_transcript.delta":
      case "response.audio_transcript.delta":
      case "response.output_text.delta":
      case "response.text.delta":
        view.appendTranscript("assistant", event.response_id, event.delta);
        break;
      case "response.done":
        this.turnEndedAt = null;
        break;
      case "error":
        if (!this.started) this.refusal = event.error; // refused before the session began
        view.error(`${event.error.code}: ${event.error.message}`);
        break;
    }
  }

  audio(event) {
    this.counters.received += 1;
    view.counters(this.counters);
    if (!this.firstAudioSeen.has(event.response_id)) {
      this.firstAudioSeen.add(event.response_id);
      if (this.turnEndedAt !== null) plot.add(plot.ttfa, performance.now() - this.turnEndedAt);
    }
    this.player.play(pcm16FromBase64(event.delta));
  }

  probeAnswered() {
    plot.add(plot.rtt, performance.now() - this.probes.shift());
    if (this.late) {
      this.late = false;
      view.status("connected", "connected");
    }
  }

  probe() {
    const now = performance.now();
    if (this.probes.length > 0 && now - this.probes[0] > PROBE_LATE_MS && !this.late) {
      this.late = true;
      const waited = Math.round((now - this.probes[0]) / 1000);
      view.status(`no answer for ${waited} s`, "error");
    }
    if (document.hidden || now - this.lastUsedAt > PROBE_UNTIL_IDLE_MS) return;
    this.probes.push(performance.now());
    this.send({ type: "session.update", event_id: `probe_${Date.now()}`, session: { type: "realtime" } });
  }

  endTurn() {
    // Without server VAD the client says when the turn is over.
    if (this.serverVad) return;
    this.turnEndedAt = performance.now();
    this.send({ type: "input_audio_buffer.commit" });
    this.send({ type: "response.create" });
  }

  async startMicrophone() {
    if (!navigator.mediaDevices) {
      // Browsers offer the microphone to secure pages only: https, localhost or 127.0.0.1.
      throw new Error(
        "this page is not a secure context: open it at http://127.0.0.1 or http://localhost " +
          "(or over https) to use the microphone; a WAV file works from anywhere",
      );
    }
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const context = new AudioContext();
    await context.audioWorklet.addModule("/playground/capture-worklet.js");
    const capture = new AudioWorkletNode(context, "pcm16-capture", { numberOfOutputs: 1 });
    capture.port.onmessage = (message) => this.appendAudio(new Int16Array(message.data));
    const mute = context.createGain();
    mute.gain.value = 0; // keeps the graph pulled without echoing the microphone
    context.createMediaStreamSource(stream).connect(capture).connect(mute).connect(context.destination);
    this.microphone = { stream, context };
    if (this.ws.readyState !== WebSocket.OPEN) this.stopMicrophone(); // closed meanwhile
  }

  stopMicrophone() {
    if (!this.microphone) return;
    for (const track of this.microphone.stream.getTracks()) track.stop();
    this.microphone.context.close();
    this.microphone = null;
    this.endTurn();
  }

  async sendFile(file) {
    const decoder = new OfflineAudioContext(1, 1, RATE);
    const decoded = await decoder.decodeAudioData(await file.arrayBuffer()); // resampled to 24 kHz
    const mono = new Float32Array(decoded.length);
    for (let c = 0; c < decoded.numberOfChannels; c++) {
      const channel = decoded.getChannelData(c);
      for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / decoded.numberOfChannels;
    }
    const silence = new Int16Array((RATE * TRAILING_SILENCE_MS) / 1000);
    const samples = new Int16Array(mono.length + silence.length);
    samples.set(pcm16FromFloat(mono));
    // At real-time pace, like a microphone: server VAD and the relay see what a caller sends.
    const started = performance.now();
    for (let offset = 0, n = 0; offset < samples.length; offset += CHUNK_SAMPLES, n++) {
      if (this.ws.readyState !== WebSocket.OPEN) return;
      this.appendAudio(samples.slice(offset, offset + CHUNK_SAMPLES));
      const due = started + ((n + 1) * CHUNK_SAMPLES * 1000) / RATE;
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, due - performance.now())));
    }
    this.endTurn();
  }

  closed(close) {
    clearInterval(this.probeTimer);
    this.stopMicrophone();
    this.player.close();
    if (session !== this) return; // a session the page already left: the view is another's
    view.connected(false);
    const reason = close.reason ? ` ${close.reason}` : "";
    if (this.refusal) {
      view.status(`refused (${close.code}${reason})`, "error");
      view.error(`${this.refusal.code}: ${this.refusal.message}`);
    } else if (!this.opened) {
      view.status("could not connect", "error");
      view.error("The relay did not answer: is it running, and is this its address?");
    } else {
      view.status(`closed (${close.code}${reason})`, close.code === 1000 ? "disconnected" : "error");
      if (close.code === 1006) {
        view.error("The connection to the relay was lost without a close: the relay stopped, or the network between.");
      }
    }
    view.log("in", { type: `close ${close.code}${reason}` });
    if (session === this) session = null;
  }

  close() {
    this.ws.close(1000, "bye");
  }
}

// --- wiring ------------------------------------------------------------------------------

$("connect-form").addEventListener("submit", (submitted) => {
  submitted.preventDefault();
  if (session) return; // one session a page: a second click while connecting opened another
  view.error("");
  view.status("connecting…", "disconnected");
  $("connect").disabled = true;
  $("disconnect").disabled = false; // an upstream that never answers can be given up on
  try {
    session = new Session($("key").value.trim(), $("deployment").value.trim());
  } catch (error) {
    $("connect").disabled = false;
    view.status("could not connect", "error");
    // The browser's message quotes the key: never shown.
    view.error(
      error instanceof DOMException && error.name === "SyntaxError"
        ? "The key holds characters a browser cannot send (a space, a comma, a non-ASCII " +
            "character): paste the key alone."
        : `could not connect: ${error.name}`,
    );
  }
});

$("disconnect").addEventListener("click", () => session?.close());

// While the microphone starts, or a file streams, the other inputs wait: two captures at
// once interleaved their audio, and Stop stopped only one of them.
function busy(on) {
  $("mic").disabled = on || !session;
  $("wav").disabled = on || !session;
  $("wav-label").dataset.disabled = String(on || !session);
}

$("mic").addEventListener("click", async () => {
  if (!session) return;
  if (session.microphone) {
    session.stopMicrophone();
    $("mic").textContent = "Start microphone";
    busy(false);
    return;
  }
  const own = session;
  view.error("");
  busy(true);
  try {
    await own.startMicrophone();
    if (session === own && own.microphone) $("mic").textContent = "Stop microphone";
  } catch (error) {
    view.error(`microphone: ${error.message}`);
  } finally {
    if (session === own) {
      busy(Boolean(own.microphone)); // a live microphone keeps the file input waiting
      $("mic").disabled = false;
    }
  }
});

$("wav").addEventListener("change", async () => {
  const file = $("wav").files[0];
  $("wav").value = "";
  if (!session || !file) return;
  const own = session;
  view.error("");
  busy(true);
  try {
    await own.sendFile(file);
  } catch (error) {
    view.error(`${file.name}: ${error.message}`);
  } finally {
    if (session === own) busy(false);
  }
});

plot.draw();
