package main

// The chat's v2 protocol (its JSON shapes are in chatapp/codec.py):
// hello and join before the probes, `say` to send, and the events clients
// receive. A `message` is read in place when it has the server's own layout
// (no decoding, no allocation): one comparison of its head, up to "seq":,
// with the head every message of the client's room and epoch has, then its
// numbers and text. Anything else is decoded with encoding/json, so a server
// that orders its keys differently is still read right, only slower.

import (
	"bytes"
	"encoding/json"
	"os"
	"strconv"
	"strings"
	"time"
)

const (
	subprotocolV2 = "chat.v2"
	// Clients that join at once. The hub handles the commands in its inbox without
	// yielding, and a join into a room of up to 1,000 is announced to every member with a
	// send() each: a thousand joins at once kept the worker from everything else, its
	// heartbeat included, for 16-22 s on a busy machine, and gunicorn killed it once (it
	// does after 30 s). Ten at a time: 2.5 s at worst on the same machine. Setting up is
	// not what the v2 scenarios measure.
	joinRound = 10
	// How a `message` event starts, and an `ack`, as chatapp/codec.py encodes them.
	messagePrefix = `{"type":"message","room":"`
	ackPrefix     = `{"type":"ack",`
)

// assignRooms puts client i in room i mod rooms; call it before the receiver starts.
func (b *bench) assignRooms() {
	for _, c := range b.conns {
		c.room = []byte(roomName(c.id%b.cfg.rooms, b.cfg.rooms))
		if b.cfg.sio {
			c.head = append(append([]byte(sioMessagePrefix), c.room...), `","nick":"`...)
		}
	}
}

func roomName(k, rooms int) string {
	if rooms == 1 {
		return "lobby"
	}
	return "r" + strconv.Itoa(k)
}

// roomSize is the number of connected clients in client i's room.
func (b *bench) roomSize(i int) int64 {
	n, rooms := len(b.conns), b.cfg.rooms
	size := n / rooms
	if i%rooms < n%rooms {
		size++
	}
	return int64(size)
}

// joinAll has every client join its room (v2: after hello with nick c<i>,
// or token i, session s<i>; Socket.IO: with nick c<i>), joinRound clients at
// a time, each round once the last has its `joined`s (Socket.IO: the join's
// acks).
func (b *bench) joinAll(n int64) {
	deadline := time.Now().Add(b.cfg.settle)
	buf := make([]byte, 0, 128)
	next := time.Now().Add(time.Second)
	for i, c := range b.conns {
		if b.cfg.sio {
			buf = b.joinSio(c, buf)
		} else {
			buf = b.joinV2(c, buf)
		}
		if (i+1)%joinRound != 0 && i+1 < len(b.conns) {
			continue
		}
		for b.joined.Load() < int64(i+1) {
			if time.Now().After(deadline) {
				fatal("only %d of %d clients joined after %v", b.joined.Load(), n, b.cfg.settle)
			}
			if time.Now().After(next) {
				progress("joined %d/%d", b.joined.Load(), n)
				next = next.Add(time.Second)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	progress("joined %d/%d", b.joined.Load(), n)
}

// joinV2 writes client c's hello and join.
func (b *bench) joinV2(c *client, buf []byte) []byte {
	buf = b.appendHello(buf[:0], c.id)
	if err := c.write(opText, buf); err != nil {
		fatal("hello: %v", err)
	}
	buf = append(append(append(buf[:0], `{"type":"join","room":"`...), c.room...), `"}`...)
	if err := c.write(opText, buf); err != nil {
		fatal("join: %v", err)
	}
	return buf
}

// appendHello appends client i's hello: nick c<i>, or with -tokens the
// token on line i (the server then takes the name from the token), and a
// session of 32 hex digits, as the page makes them (appendID).
func (b *bench) appendHello(buf []byte, i int) []byte {
	if len(b.tokens) > 0 {
		buf = append(append(buf, `{"type":"hello","token":"`...), b.tokens[i]...)
	} else {
		buf = append(append(buf, `{"type":"hello","nick":"c`...), strconv.Itoa(i)...)
	}
	buf = appendID(appendID(append(buf, `","session":"`...), uint64(i), 0), uint64(i), 1)
	return append(buf, `"}`...)
}

// appendID appends 16 hex digits that look random but are the same in every
// run, for x and a salt: the page's sessions are 32 (two of these) and its
// refs 16, and what they cost the server, in Redis above all, goes with
// their length.
func appendID(buf []byte, x, salt uint64) []byte {
	z := x*0x9e3779b97f4a7c15 + salt*0xbf58476d1ce4e5b9 + 0x94d049bb133111eb // splitmix64's mix
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	z ^= z >> 31
	const digits = "0123456789abcdef"
	for shift := 60; shift >= 0; shift -= 4 {
		buf = append(buf, digits[(z>>uint(shift))&15])
	}
	return buf
}

// readTokens reads -tokens: one JWT a line, at least need of them (one per
// client, or per handshake goroutine: CHAT_MAX_CONNECTIONS_PER_USER).
func readTokens(path string, need int) []string {
	data, err := os.ReadFile(path)
	if err != nil {
		fatal("-tokens: %v", err)
	}
	var tokens []string
	for _, line := range strings.Split(string(data), "\n") {
		if line = strings.TrimSpace(line); line == "" {
			continue
		}
		// A JWT's compact form is base64url and dots: nothing to escape in the hello's JSON.
		if strings.Trim(line, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.") != "" {
			fatal("-tokens: line %d is not a JWT in compact form", len(tokens)+1)
		}
		tokens = append(tokens, line)
	}
	if len(tokens) < need {
		fatal("-tokens: %d tokens in %s, need %d (a user has a few connections at most)", len(tokens), path, need)
	}
	return tokens
}

// probeRooms says "hello <probe>" in every room, from the room's first client
// (client k is the first of room k).
func (b *bench) probeRooms(probe int) {
	buf := make([]byte, 0, 128)
	text := strconv.Itoa(probe)
	for k := 0; k < b.cfg.rooms; k++ {
		c := b.conns[k]
		if b.cfg.sio {
			buf = append(append(append(buf[:0], sioSay...), c.room...), `","text":"hello `...)
			buf = append(append(buf, text...), `"}]`...)
		} else {
			buf = append(append(append(buf[:0], `{"type":"say","room":"`...), c.room...), `","text":"hello `...)
			buf = append(append(append(buf, text...), `","ref":"p`...), text...)
			buf = append(buf, `"}`...)
		}
		if err := c.write(opText, buf); err != nil {
			fatal("probe: %v", err)
		}
	}
}

// event accounts one v2 event a client received.
func (b *bench) event(c *client, data []byte, now int64) {
	if h := c.head; len(h) > 0 && len(data) > len(h) && string(data[:len(h)]) == string(h) {
		if seq, text, ok := parseTail(data[len(h):]); ok {
			b.roomSeq(c, seq, text, now)
			return
		}
	}
	if room, epoch, seq, text, ok := parseMessage(data); ok {
		b.roomMessage(c, room, epoch, seq, text, now)
		return
	}
	if len(data) >= len(ackPrefix) && string(data[:len(ackPrefix)]) == ackPrefix {
		b.acks.Add(1)
		return
	}
	var ev struct {
		Type, Room, Epoch, Text, Code, Message string
		Seq                                    int64
	}
	if err := json.Unmarshal(data, &ev); err != nil {
		b.surprise("client %d: not a JSON event: %.80q", c.id, data)
		return
	}
	switch ev.Type {
	case "message": // keys in another order than the server's own
		b.roomMessage(c, []byte(ev.Room), []byte(ev.Epoch), ev.Seq, []byte(ev.Text), now)
	case "ack":
		b.acks.Add(1)
	case "joined":
		if ev.Room != string(c.room) || c.roomNext != 0 {
			// A second joined: the room's epoch changed under its members (history lost).
			b.surprise("client %d: joined %s epoch %s seq %d, after joining %s epoch %s",
				c.id, ev.Room, ev.Epoch, ev.Seq, c.room, c.epoch)
		} else {
			b.joined.Add(1)
		}
		if ev.Room == string(c.room) {
			c.epoch, c.roomNext = []byte(ev.Epoch), ev.Seq+1
			c.head = append(append(append(append([]byte(messagePrefix), c.room...), `","epoch":"`...), c.epoch...), `","seq":`...)
		}
	case "error":
		if b.errors.Add(1) <= 3 {
			progress("client %d: error %s: %s", c.id, ev.Code, ev.Message)
		}
	case "welcome", "presence", "left", "rooms":
	default:
		b.surprise("client %d: unknown event %.80q", c.id, data)
	}
}

// roomMessage accounts a message unless it is not of the client's room and epoch.
func (b *bench) roomMessage(c *client, room, epoch []byte, seq int64, text []byte, now int64) {
	if c.roomNext == 0 || !bytes.Equal(room, c.room) || !bytes.Equal(epoch, c.epoch) {
		b.surprise("client %d (in %s epoch %s): message %s:%s:%d", c.id, c.room, c.epoch, room, epoch, seq)
		return
	}
	b.roomSeq(c, seq, text, now)
}

// roomSeq checks the seq of a message of the client's room, then accounts its text like a v1 line.
func (b *bench) roomSeq(c *client, seq int64, text []byte, now int64) {
	if exp := c.roomNext; seq < exp {
		b.reorders.Add(1)
	} else {
		if seq > exp {
			b.gaps.Add(seq - exp)
		}
		c.roomNext = seq + 1
	}
	b.line(c, text, now)
}

func (b *bench) surprise(format string, args ...any) {
	if b.unexpected.Add(1) <= 3 {
		progress(format, args...)
	}
}

// parseMessage reads a `message` event laid out as the server encodes it:
// {"type":"message","room":R,"epoch":E,"seq":N,"time":T,"nick":null|S,"text":S}.
// ok is false for anything else, including strings with escapes.
func parseMessage(data []byte) (room, epoch []byte, seq int64, text []byte, ok bool) {
	s := scanner{data}
	ok = s.lit(messagePrefix)
	room, ok = s.str(ok)
	ok = ok && s.lit(`,"epoch":"`)
	epoch, ok = s.str(ok)
	ok = ok && s.lit(`,"seq":`)
	if !ok {
		return nil, nil, 0, nil, false
	}
	seq, text, ok = parseTail(s.rest)
	return room, epoch, seq, text, ok
}

// parseTail reads a `message` event from its seq on:
// N,"time":T,"nick":null|S[,"user":null|S],"text":S}.
func parseTail(data []byte) (seq int64, text []byte, ok bool) {
	s := scanner{data}
	seq, ok = s.num(true)
	ok = ok && s.lit(`,"time":`)
	_, ok = s.num(ok)
	ok = ok && s.lit(`,"nick":`)
	ok = ok && s.nullOrStr()
	if ok && s.lit(`,"user":`) {
		ok = s.nullOrStr()
	}
	ok = ok && s.lit(`,"text":"`)
	text, ok = s.str(ok)
	ok = ok && s.lit("}") && len(s.rest) == 0
	return seq, text, ok
}

// scanner reads JSON of a known layout in place; each step takes the previous
// step's ok and does nothing once one failed.
type scanner struct{ rest []byte }

// nullOrStr reads null or a whole string.
func (s *scanner) nullOrStr() bool {
	if s.lit("null") {
		return true
	}
	_, ok := s.str(s.lit(`"`))
	return ok
}

func (s *scanner) lit(l string) bool {
	if len(s.rest) < len(l) || string(s.rest[:len(l)]) != l {
		return false
	}
	s.rest = s.rest[len(l):]
	return true
}

// str reads the rest of a string whose opening quote is read, and its closing quote.
func (s *scanner) str(ok bool) ([]byte, bool) {
	if !ok {
		return nil, false
	}
	i := bytes.IndexByte(s.rest, '"')
	if i < 0 || bytes.IndexByte(s.rest[:i], '\\') >= 0 {
		return nil, false
	}
	v := s.rest[:i]
	s.rest = s.rest[i+1:]
	return v, true
}

func (s *scanner) num(ok bool) (int64, bool) {
	if !ok {
		return 0, false
	}
	v, n := digits(s.rest)
	s.rest = s.rest[n:]
	return v, n > 0
}
