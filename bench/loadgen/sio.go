package main

// Socket.IO 5 over Engine.IO 4, WebSocket transport only (no polling first):
// every text frame is one Engine.IO packet, a digit then its data. The server
// opens with `0{"sid":...}`; the client connects to the default namespace
// with `40` and the server answers `40{"sid":...}`. Events go both ways as
// `42["name",arg]` (a client's `42<id>[...]` asks for an ack, answered as
// `43<id>[...]`), and the server pings (`2`) every pingInterval: a client that
// does not answer `3` within pingTimeout is dropped.
//
// The peer (bench/peers/socketio_peer.py) has two events: `join` {room, nick},
// acked, and `say` {room, text}, which it emits to the room as `message`
// {room, nick, text}. A message is read in place when it has that layout (the
// head up to the nick is compared in one go, as v2.go does), anything else is
// decoded with encoding/json. There is no room seq: each client checks each
// sender's order and gaps, as in v1.

import (
	"bytes"
	"encoding/json"
	"strconv"
	"time"
)

const (
	// A say's start; the room, `","text":"`, the text and `"}]` follow.
	sioSay = `42["say",{"room":"`
	// How a message event starts, up to the room; `","nick":"` follows it.
	sioMessagePrefix = `42["message",{"room":"`
	// The ack of a join, which is sent with ack id 1.
	sioJoinAck = `31[`
)

// connectNamespace waits until every client has connected to the default
// namespace (the receiver answers each server's open packet with `40`).
func (b *bench) connectNamespace(n int64) {
	deadline := time.Now().Add(b.cfg.settle)
	for b.nsConnected.Load() < n {
		if time.Now().After(deadline) {
			fatal("only %d of %d clients connected to the namespace after %v", b.nsConnected.Load(), n, b.cfg.settle)
		}
		time.Sleep(5 * time.Millisecond)
	}
	progress("connected %d/%d to the namespace", n, n)
}

// joinSio writes client c's join (nick c<i>), asking for an ack.
func (b *bench) joinSio(c *client, buf []byte) []byte {
	buf = append(append(append(buf[:0], `421["join",{"room":"`...), c.room...), `","nick":"c`...)
	buf = append(strconv.AppendInt(buf, int64(c.id), 10), `"}]`...)
	if err := c.write(opText, buf); err != nil {
		fatal("join: %v", err)
	}
	return buf
}

// packet accounts one Engine.IO packet a client received.
func (b *bench) packet(c *client, data []byte, now int64) {
	if h := c.head; len(data) > len(h) && string(data[:len(h)]) == string(h) {
		if text, ok := parseSioTail(data[len(h):]); ok {
			b.line(c, text, now)
			return
		}
	}
	if len(data) == 0 {
		b.surprise("client %d: empty Engine.IO packet", c.id)
		return
	}
	switch data[0] {
	case '0': // open
		if err := c.write(opText, []byte("40")); err != nil {
			b.surprise("client %d: namespace connect: %v", c.id, err)
		}
	case '2': // ping
		b.pings.Add(1)
		if err := c.write(opText, []byte("3")); err != nil {
			b.surprise("client %d: pong: %v", c.id, err)
		}
	case '4': // message: a Socket.IO packet
		b.sioPacket(c, data[1:], now)
	case '6': // noop
	default:
		b.surprise("client %d: Engine.IO packet %.80q", c.id, data)
	}
}

// sioPacket accounts one Socket.IO packet of the default namespace.
func (b *bench) sioPacket(c *client, data []byte, now int64) {
	switch {
	case len(data) > 1 && data[0] == '0' && data[1] == '{': // connected to the namespace
		b.nsConnected.Add(1)
	case len(data) > 1 && data[0] == '2': // an event in another layout than the peer's own
		var event []json.RawMessage
		var msg struct{ Room, Nick, Text string }
		if json.Unmarshal(data[1:], &event) != nil || len(event) != 2 ||
			string(event[0]) != `"message"` || json.Unmarshal(event[1], &msg) != nil {
			b.surprise("client %d: not a message event: %.80q", c.id, data)
		} else if msg.Room != string(c.room) {
			b.surprise("client %d (in %s): message of %s", c.id, c.room, msg.Room)
		} else {
			b.line(c, []byte(msg.Text), now)
		}
	case bytes.HasPrefix(data, []byte(sioJoinAck)):
		b.joined.Add(1)
	case len(data) > 0 && data[0] == '4': // CONNECT_ERROR
		if b.errors.Add(1) <= 3 {
			progress("client %d: connect error %.80q", c.id, data)
		}
	default:
		b.surprise("client %d: Socket.IO packet %.80q", c.id, data)
	}
}

// parseSioTail reads a message event from its nick on: S,"text":S}].
func parseSioTail(data []byte) (text []byte, ok bool) {
	s := scanner{data}
	_, ok = s.str(true)
	ok = ok && s.lit(`,"text":"`)
	text, ok = s.str(ok)
	ok = ok && s.lit("}]") && len(s.rest) == 0
	return text, ok
}
