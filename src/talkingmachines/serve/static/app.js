// TalkingMachines call page: one RTCPeerConnection to POST /offer (aiortc convention).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const stage = $("stage"), avatar = $("avatar"), self = $("self"), stateEl = $("state");
  const callBtn = $("call"), micBtn = $("mic"), msg = $("message"), sayForm = $("say"), textIn = $("text");
  const token = new URLSearchParams(location.search).get("token");
  const auth = token ? { Authorization: "Bearer " + token } : {};
  let pc = null, dc = null, local = null, sessionId = null, sessionSecret = null, portrait = null, tCall = 0, pingTimer = null;
  // exposed for tests and debugging
  const tm = (window.tm = { state: "ready", rtf: null, latencyMs: null, firstFrameMs: null, events: [], sessionId: null });

  function setState(s) {
    tm.state = s;
    stateEl.textContent = s;
    stateEl.className = "pill " + s;
  }
  function say(text) { msg.textContent = text || ""; }

  fetch("/config", { headers: auth }).then((r) => r.json()).then((c) => {
    tm.config = c;
    if (c.text_input) sayForm.hidden = false;
  }).catch(() => {});

  $("portrait").addEventListener("change", async (ev) => {
    const f = ev.target.files && ev.target.files[0];
    if (!f) return;
    portrait = await shrink(f, 768);
    const img = $("portrait-preview");
    img.src = portrait;
    img.hidden = false;
    if (pc) { await hangup(); await call(); }  // a new face needs a new call
  });

  // downscale big photos before upload (keeps the offer small)
  function shrink(file, side) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const s = Math.min(1, side / Math.max(img.width, img.height));
        const c = document.createElement("canvas");
        c.width = Math.round(img.width * s); c.height = Math.round(img.height * s);
        c.getContext("2d").drawImage(img, 0, 0, c.width, c.height);
        resolve(c.toDataURL("image/jpeg", 0.9));
      };
      img.onerror = reject;
      img.src = URL.createObjectURL(file);
    });
  }

  async function getMedia() {
    const audio = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
    try { return await navigator.mediaDevices.getUserMedia({ audio, video: { width: 320, height: 240, facingMode: "user" } }); }
    catch (e) {
      try { return await navigator.mediaDevices.getUserMedia({ audio }); }
      catch (e2) { say("No microphone: you can still watch and type."); return null; }
    }
  }

  async function call() {
    say("");
    setState("connecting");
    callBtn.disabled = true;
    tCall = performance.now();
    tm.firstFrameMs = null;
    try {
      local = navigator.mediaDevices ? await getMedia() : null;
      pc = new RTCPeerConnection({ iceServers: [] });
      const kinds = new Set();
      if (local) {
        self.srcObject = local;
        for (const t of local.getTracks()) { pc.addTrack(t, local); kinds.add(t.kind); }
      }
      if (!kinds.has("audio")) pc.addTransceiver("audio", { direction: "recvonly" });
      if (!kinds.has("video")) pc.addTransceiver("video", { direction: "recvonly" });
      const remote = new MediaStream();
      avatar.srcObject = remote;
      pc.ontrack = (e) => { remote.addTrack(e.track); avatar.play().catch(() => {}); };
      pc.onconnectionstatechange = () => {
        if (pc && (pc.connectionState === "failed" || pc.connectionState === "closed")) {
          say("Call ended (" + pc.connectionState + ")"); hangup();
        }
      };
      dc = pc.createDataChannel("control");
      dc.onmessage = (e) => onEvent(JSON.parse(e.data));
      dc.onopen = () => { pingTimer = setInterval(() => dc.readyState === "open" && dc.send(JSON.stringify({ type: "ping", t: Date.now() })), 1000); };

      await pc.setLocalDescription(await pc.createOffer());
      await new Promise((resolve) => {  // aiortc does not trickle: send the complete offer
        if (pc.iceGatheringState === "complete") return resolve();
        pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
        setTimeout(resolve, 2500);
      });
      const body = { sdp: pc.localDescription.sdp, type: pc.localDescription.type };
      if (portrait) body.portrait = portrait;
      const r = await fetch("/offer", { method: "POST", headers: { "Content-Type": "application/json", ...auth }, body: JSON.stringify(body) });
      const ans = await r.json().catch(() => ({ message: r.statusText }));
      if (!r.ok) throw new Error(r.status === 503 ? "The avatar is busy: " + (ans.message || "try again later") : (ans.message || r.statusText));
      sessionId = tm.sessionId = ans.id;
      sessionSecret = ans.secret;  // proves to /hangup that this page owns the call
      await pc.setRemoteDescription({ sdp: ans.sdp, type: ans.type });
      stage.className = "incall";
      callBtn.classList.add("hangup");
      callBtn.title = "Hang up";
      micBtn.disabled = !(local && local.getAudioTracks().length);
      setState("listening");
    } catch (e) {
      say(String(e.message || e));
      await hangup(true);
    } finally {
      callBtn.disabled = false;
    }
  }

  function onFirstFrame() {
    if (tm.firstFrameMs === null && tCall) {
      tm.firstFrameMs = Math.round(performance.now() - tCall);
      $("ttff").textContent = tm.firstFrameMs + " ms";
    }
  }
  avatar.addEventListener("playing", onFirstFrame);
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    const tick = () => { if (avatar.videoWidth) onFirstFrame(); avatar.requestVideoFrameCallback(tick); };
    avatar.requestVideoFrameCallback(tick);
  }

  function onEvent(ev) {
    tm.events.push(ev);
    if (tm.events.length > 200) tm.events.shift();
    if (ev.type === "state") {
      setState(ev.state);
      tm.rtf = ev.rtf; tm.latencyMs = ev.latency_ms;
      $("rtf").textContent = ev.rtf.toFixed(2);
      $("latency").textContent = Math.round(ev.latency_ms) + " ms";
    } else if (ev.type === "error") {
      say(ev.text);
    } else if (ev.type === "interrupted") {
      setState("listening");
    }
  }

  async function hangup(silent) {
    clearInterval(pingTimer);
    const id = sessionId, secret = sessionSecret;
    sessionId = tm.sessionId = sessionSecret = null;
    if (id) fetch("/hangup", { method: "POST", keepalive: true, headers: { "Content-Type": "application/json", ...auth }, body: JSON.stringify({ id, secret }) }).catch(() => {});
    if (dc) { try { dc.close(); } catch (e) {} dc = null; }
    if (pc) { const p = pc; pc = null; p.close(); }
    if (local) { local.getTracks().forEach((t) => t.stop()); local = null; }
    avatar.srcObject = null; self.srcObject = null;
    stage.className = "idle";
    callBtn.classList.remove("hangup");
    callBtn.title = "Call";
    micBtn.disabled = true; micBtn.setAttribute("aria-pressed", "false");
    setState("ready");
  }

  callBtn.addEventListener("click", () => (pc ? hangup() : call()));
  micBtn.addEventListener("click", () => {
    const t = local && local.getAudioTracks()[0];
    if (!t) return;
    t.enabled = !t.enabled;
    micBtn.setAttribute("aria-pressed", String(!t.enabled));
    micBtn.title = t.enabled ? "Mute microphone" : "Unmute microphone";
  });
  sayForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = textIn.value.trim();
    if (!text) return;
    if (!dc || dc.readyState !== "open") { say("Place a call first."); return; }
    dc.send(JSON.stringify({ type: "text", text }));
    textIn.value = "";
  });
  window.addEventListener("pagehide", () => sessionId && hangup(true));
  tm.call = call;
  tm.hangup = hangup;
})();
