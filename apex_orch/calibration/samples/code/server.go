// Command notes serves a small JSON API for notes, with request logging,
// graceful shutdown and an in-memory store guarded by a RWMutex.
//
//	GET    /notes          list notes (optional ?tag=work)
//	POST   /notes          create {"title": "...", "body": "...", "tags": ["..."]}
//	GET    /notes/{id}     fetch one
//	DELETE /notes/{id}     delete one
package main

import (
	"context"
	"encoding/json"
	"errors"
	"log"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

type Note struct {
	ID        int       `json:"id"`
	Title     string    `json:"title"`
	Body      string    `json:"body"`
	Tags      []string  `json:"tags,omitempty"`
	CreatedAt time.Time `json:"created_at"`
}

type Store struct {
	mu     sync.RWMutex
	nextID int
	notes  map[int]Note
}

func NewStore() *Store {
	return &Store{nextID: 1, notes: make(map[int]Note)}
}

func (s *Store) Create(n Note) Note {
	s.mu.Lock()
	defer s.mu.Unlock()
	n.ID = s.nextID
	n.CreatedAt = time.Now().UTC()
	s.nextID++
	s.notes[n.ID] = n
	return n
}

func (s *Store) Get(id int) (Note, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	n, ok := s.notes[id]
	return n, ok
}

func (s *Store) Delete(id int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.notes[id]; !ok {
		return false
	}
	delete(s.notes, id)
	return true
}

func (s *Store) List(tag string) []Note {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]Note, 0, len(s.notes))
	for _, n := range s.notes {
		if tag == "" || contains(n.Tags, tag) {
			out = append(out, n)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func contains(items []string, want string) bool {
	for _, it := range items {
		if strings.EqualFold(it, want) {
			return true
		}
	}
	return false
}

type apiError struct {
	Error string `json:"error"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if err := json.NewEncoder(w).Encode(v); err != nil {
		log.Printf("encode response: %v", err)
	}
}

type server struct {
	store *Store
}

func (srv *server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /notes", srv.listNotes)
	mux.HandleFunc("POST /notes", srv.createNote)
	mux.HandleFunc("GET /notes/{id}", srv.getNote)
	mux.HandleFunc("DELETE /notes/{id}", srv.deleteNote)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	return logRequests(mux)
}

func (srv *server) listNotes(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, srv.store.List(r.URL.Query().Get("tag")))
}

func (srv *server) createNote(w http.ResponseWriter, r *http.Request) {
	var in Note
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		writeJSON(w, http.StatusBadRequest, apiError{"invalid JSON: " + err.Error()})
		return
	}
	if strings.TrimSpace(in.Title) == "" {
		writeJSON(w, http.StatusUnprocessableEntity, apiError{"title is required"})
		return
	}
	writeJSON(w, http.StatusCreated, srv.store.Create(in))
}

func parseID(r *http.Request) (int, error) {
	id, err := strconv.Atoi(r.PathValue("id"))
	if err != nil || id < 1 {
		return 0, errors.New("id must be a positive integer")
	}
	return id, nil
}

func (srv *server) getNote(w http.ResponseWriter, r *http.Request) {
	id, err := parseID(r)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, apiError{err.Error()})
		return
	}
	n, ok := srv.store.Get(id)
	if !ok {
		writeJSON(w, http.StatusNotFound, apiError{"note not found"})
		return
	}
	writeJSON(w, http.StatusOK, n)
}

func (srv *server) deleteNote(w http.ResponseWriter, r *http.Request) {
	id, err := parseID(r)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, apiError{err.Error()})
		return
	}
	if !srv.store.Delete(id) {
		writeJSON(w, http.StatusNotFound, apiError{"note not found"})
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (rec *statusRecorder) WriteHeader(code int) {
	rec.status = code
	rec.ResponseWriter.WriteHeader(code)
}

func logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(rec, r)
		log.Printf("%s %s %d %s", r.Method, r.URL.Path, rec.status, time.Since(start).Round(time.Microsecond))
	})
}

func main() {
	addr := ":8080"
	if v := os.Getenv("NOTES_ADDR"); v != "" {
		addr = v
	}
	srv := &http.Server{
		Addr:              addr,
		Handler:           (&server{store: NewStore()}).routes(),
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       60 * time.Second,
	}

	go func() {
		log.Printf("listening on %s", addr)
		if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Fatalf("server: %v", err)
		}
	}()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Printf("shutdown: %v", err)
	}
	log.Print("bye")
}
