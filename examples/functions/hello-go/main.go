// hello-go: reference pgstack function (stdlib only). See ../README.md for the contract.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const maxBody = 10 << 20 // 10 MiB

var errTooLarge = errors.New("too large")

type echo struct {
	Function  string              `json:"function"`
	Method    string              `json:"method"`
	Path      string              `json:"path"`
	Role      *string             `json:"role"`
	Sub       *string             `json:"sub"`
	Claims    json.RawMessage     `json:"claims"` // nil marshals as null
	Headers   map[string][]string `json:"headers"`
	Body      string              `json:"body"`
	BodyBytes int                 `json:"bodyBytes"`
	Runtime   string              `json:"runtime"`
}

func send(w http.ResponseWriter, r *http.Request, status int, ctype string, body []byte) {
	w.Header().Set("Content-Type", ctype)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
}

func sendJSON(w http.ResponseWriter, r *http.Request, status int, v any) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		status, buf = http.StatusInternalServerError, *bytes.NewBufferString(`{"error":"internal error"}`)
	}
	send(w, r, status, "application/json", bytes.TrimRight(buf.Bytes(), "\n"))
}

func first(h http.Header, key string) *string {
	if v := h[key]; len(v) > 0 {
		return &v[0]
	}
	return nil
}

func handle(w http.ResponseWriter, r *http.Request) {
	path, _, _ := strings.Cut(r.RequestURI, "?") // raw target: never decoded or cleaned
	if path == "/healthz" {
		send(w, r, http.StatusOK, "text/plain", []byte("ok"))
		return
	}
	rest := strings.TrimPrefix(path, "/functions/v1/")
	if rest == path {
		sendJSON(w, r, http.StatusNotFound, map[string]string{"error": "not found"})
		return
	}
	var body []byte
	err := errTooLarge
	if r.ContentLength <= maxBody {
		if body, err = io.ReadAll(io.LimitReader(r.Body, maxBody+1)); err == nil && len(body) > maxBody {
			err = errTooLarge
		}
	}
	if err != nil {
		status, msg := http.StatusBadRequest, "bad request body"
		if err == errTooLarge {
			status, msg = http.StatusRequestEntityTooLarge, "payload too large"
		}
		w.Header().Set("Connection", "close")
		sendJSON(w, r, status, map[string]string{"error": msg})
		return
	}
	out := echo{Method: r.Method, Path: r.RequestURI, Role: first(r.Header, "X-Pgstack-Role"),
		Sub: first(r.Header, "X-Pgstack-Sub"), Headers: map[string][]string{}, Body: string(body),
		BodyBytes: len(body), Runtime: "go"}
	out.Function, _, _ = strings.Cut(rest, "/")
	if c := first(r.Header, "X-Pgstack-Claims"); c != nil {
		if !json.Valid([]byte(*c)) {
			sendJSON(w, r, http.StatusBadRequest, map[string]string{"error": "bad claims header"})
			return
		}
		out.Claims = json.RawMessage(*c)
	}
	if r.Host != "" { // net/http moves Host and chunked Transfer-Encoding out of r.Header
		out.Headers["host"] = []string{r.Host}
	}
	if len(r.TransferEncoding) > 0 {
		out.Headers["transfer-encoding"] = []string{strings.Join(r.TransferEncoding, ", ")}
	}
	for k, v := range r.Header {
		out.Headers[strings.ToLower(k)] = append(out.Headers[strings.ToLower(k)], v...)
	}
	sendJSON(w, r, http.StatusOK, out)
}

func env(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func main() {
	host := env("HOST", "0.0.0.0")
	ln, err := net.Listen("tcp", net.JoinHostPort(host, env("PORT", "8000")))
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	fmt.Printf("listening on http://%s\n", net.JoinHostPort(host, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)))

	srv := &http.Server{Handler: http.HandlerFunc(handle), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 65 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
	<-done
}
