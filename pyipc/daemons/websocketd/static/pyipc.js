// pyipc.js: a small, dependency-free client for pyipc services behind
// `pyipc websocketd` (served by it at /pyipc.js). One WebSocket message is
// one pyipc message, both ways.
//
//   const conn = await pyipc.connect("chat");     // ws(s)://this host/chat
//   conn.send(new Uint8Array([1, 2, 3]));         // bytes: one message
//   conn.send("hello");                           // a str: its UTF-8 bytes
//   const bytes = await conn.recv();              // Uint8Array (or conn.onmessage)
//
// Typed messages, as pyipc.Registry("json") writes them: one type byte, then
// the body as compact UTF-8 JSON (an object of the class's fields):
//
//   const registry = new pyipc.Registry();
//   registry.register(1, "Join");                 // same numbers as the Python side
//   conn.sendTyped(registry.encode("Join", {name: "ada"}));
//   const {type, body} = registry.decode(await conn.recv());   // type: "Welcome"
//
// Bound: messages received and not yet taken (by recv() or onmessage) are
// buffered up to `maxBuffered` bytes (pyipc.connect(name, {maxBuffered}),
// default pyipc.DEFAULT_MAX_BUFFERED, 64 MiB; Infinity: no bound). Past it the
// page is not keeping up: the connection is closed with code 4001 (the
// service sees its connection end); what was buffered can still be taken.
//
// Errors: send() on a closed connection throws; recv() rejects once the
// connection is closed and no message is left (error.code, error.reason);
// recvText() throws a TypeError for a message that is not UTF-8 (the message
// is consumed). close(code, reason): the browser takes code 1000 or
// 3000-4999 and a reason of at most 123 UTF-8 bytes (else it throws).
(function (root) {
  "use strict";

  const DEFAULT_MAX_BUFFERED = 64 * 1024 * 1024;
  // The close code of a connection whose page did not take its messages.
  const CLOSE_NOT_READ = 4001;
  const encoder = new TextEncoder();
  const decoder = new TextDecoder("utf-8", { fatal: true });

  function asBytes(data) {
    if (data instanceof Uint8Array) return data;
    if (data instanceof ArrayBuffer) return new Uint8Array(data);
    if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    throw new TypeError("a message is a string, an ArrayBuffer or a typed array");
  }

  // The typed-message wire form of pyipc.typed (codec "json").
  function encodeTyped(number, body) {
    if (!Number.isInteger(number) || number < 0 || number > 255)
      throw new RangeError("a message type is an integer from 0 to 255, not " + number);
    const json = encoder.encode(JSON.stringify(body === undefined ? {} : body));
    const payload = new Uint8Array(json.length + 1);
    payload[0] = number;
    payload.set(json, 1);
    return payload;
  }

  function decodeTyped(payload) {
    const bytes = asBytes(payload);
    if (bytes.length === 0) throw new Error("empty payload: a typed message needs its type byte");
    return { number: bytes[0], body: JSON.parse(decoder.decode(bytes.subarray(1))) };
  }

  // Type numbers <-> names, like a Python Registry's numbers <-> classes.
  class Registry {
    constructor() { this.byNumber = new Map(); this.byName = new Map(); }
    register(number, name) {
      if (this.byNumber.has(number) || this.byName.has(name))
        throw new Error("message type " + number + " / " + name + " is already registered");
      this.byNumber.set(number, name);
      this.byName.set(name, number);
      return this;
    }
    encode(name, body) {
      const number = this.byName.get(name);
      if (number === undefined) throw new Error("unregistered message type " + name);
      return encodeTyped(number, body);
    }
    decode(payload) {
      const { number, body } = decodeTyped(payload);
      const name = this.byNumber.get(number);
      if (name === undefined) throw new Error("unknown message type " + number);
      return { type: name, number: number, body: body };
    }
  }

  class ConnectionClosed extends Error {
    constructor(code, reason) {
      super("connection closed (" + code + (reason ? " " + reason : "") + ")");
      this.code = code;
      this.reason = reason;
    }
  }

  // One WebSocket to one service. Messages arrive in order: first to the
  // recv() calls waiting, then to onmessage when it is set, else they are
  // buffered for recv(). Setting onmessage hands it the buffered ones first.
  class Connection {
    constructor(url, options) {
      const max = options && options.maxBuffered !== undefined ?
        options.maxBuffered : DEFAULT_MAX_BUFFERED;
      if (typeof max !== "number" || !(max >= 0))
        throw new RangeError("maxBuffered is a number of bytes >= 0, not " + max);
      this.ws = new WebSocket(url);
      this.ws.binaryType = "arraybuffer";
      this._onmessage = null;    // function (Uint8Array)
      this.onclose = null;       // function ({code, reason, wasClean})
      this.received = [];
      this.maxBuffered = max;
      this.bufferedBytes = 0;    // the bytes of the messages in `received`
      this.waiters = [];
      this.closeEvent = null;
      this.opened = new Promise((resolve, reject) => {
        this.ws.addEventListener("open", () => resolve(this));
        this.ws.addEventListener("close", (ev) => reject(new ConnectionClosed(ev.code, ev.reason)));
      });
      this.closed = new Promise((resolve) => {
        this.ws.addEventListener("close", (ev) => {
          this.closeEvent = { code: ev.code, reason: ev.reason, wasClean: ev.wasClean };
          for (const w of this.waiters.splice(0)) w.reject(new ConnectionClosed(ev.code, ev.reason));
          // Settled before the user's handler runs: one that throws must not
          // leave `closed` (and close()) pending forever.
          resolve(this.closeEvent);
          if (this.onclose) this.onclose(this.closeEvent);
        });
      });
      this.ws.addEventListener("message", (ev) => this._receive(ev.data));
    }

    get onmessage() { return this._onmessage; }
    set onmessage(handler) {
      this._onmessage = handler;
      // What was buffered goes to it first, in order (it was kept for a
      // recv() that will not come).
      while (handler && this._onmessage === handler && this.received.length)
        handler(this._take());
    }

    _take() {
      const bytes = this.received.shift();
      this.bufferedBytes -= bytes.length;
      return bytes;
    }

    _receive(data) {
      // websocketd sends binary only; a text message (another server) is UTF-8.
      const bytes = typeof data === "string" ? encoder.encode(data) : new Uint8Array(data);
      if (this.waiters.length) this.waiters.shift().resolve(bytes);
      else if (this._onmessage && !this.received.length) this._onmessage(bytes);
      else {
        // Behind messages still buffered (a handler that threw while they
        // were handed over): in order, after them.
        this.received.push(bytes);
        this.bufferedBytes += bytes.length;
        if (this.bufferedBytes > this.maxBuffered && this.ws.readyState === WebSocket.OPEN)
          this.ws.close(CLOSE_NOT_READ, "more than " + this.maxBuffered +
                        " bytes received and not taken (maxBuffered)");
        if (this._onmessage) this.onmessage = this._onmessage;
      }
    }

    // One message: a string goes as a text message (the service gets its
    // UTF-8 bytes), anything else as a binary message.
    send(data) {
      const state = this.ws.readyState;
      if (state !== WebSocket.OPEN)
        throw new ConnectionClosed(this.closeEvent ? this.closeEvent.code : 0,
                                   state === WebSocket.CONNECTING ? "not open yet" :
                                   state === WebSocket.CLOSING ? "closing" : "closed");
      this.ws.send(typeof data === "string" ? data : asBytes(data));
    }

    // A typed message: sendTyped(number, body), or the bytes of
    // registry.encode(name, body).
    sendTyped(number, body) {
      if (typeof number === "string")
        throw new TypeError("sendTyped(number, body) takes a type number; for a type " +
                            "name use sendTyped(registry.encode(name, body))");
      this.send(typeof number === "number" ? encodeTyped(number, body) : asBytes(number));
    }

    // The next message (Uint8Array).
    recv() {
      if (this.received.length) return Promise.resolve(this._take());
      if (this.closeEvent)
        return Promise.reject(new ConnectionClosed(this.closeEvent.code, this.closeEvent.reason));
      return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
    }

    // The next message as text (UTF-8).
    async recvText() { return decoder.decode(await this.recv()); }

    // The next message as a typed message: {number, body}.
    async recvTyped() { return decodeTyped(await this.recv()); }

    // Bytes accepted by send() and not yet handed to the network (the
    // browser's side of backpressure: wait while it is large).
    get bufferedAmount() { return this.ws.bufferedAmount; }

    close(code, reason) { this.ws.close(code || 1000, reason || ""); return this.closed; }
  }

  // A Connection to service `name` on the host that served the page, with
  // an optional query ("chat?token=x": the name is encoded, the query kept),
  // or a full ws:// / wss:// URL; resolves once open. options: {maxBuffered}.
  function connect(nameOrUrl, options) {
    let url = nameOrUrl;
    if (!/^wss?:\/\//.test(url)) {
      const scheme = root.location && root.location.protocol === "https:" ? "wss://" : "ws://";
      const at = nameOrUrl.indexOf("?");
      const name = at < 0 ? nameOrUrl : nameOrUrl.slice(0, at);
      const query = at < 0 ? "" : nameOrUrl.slice(at);
      url = scheme + root.location.host + "/" + encodeURIComponent(name) + query;
    }
    return new Connection(url, options).opened;
  }

  root.pyipc = { connect, Connection, ConnectionClosed, Registry, encodeTyped, decodeTyped,
                 DEFAULT_MAX_BUFFERED, CLOSE_NOT_READ };
})(typeof self !== "undefined" ? self : this);
