// Renders an Ollama chat template the way Ollama does, for tests/test_export.py: Go's text/template over
// {System, Messages, IsThinkSet, Think}, the messages collated as Ollama's template.collate does (system messages
// joined into .System and kept among .Messages; consecutive messages of one role merged).
// Usage: go run render_ollama_template.go TEMPLATE_FILE < messages.json
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role     string `json:"role"`
	Content  string `json:"content"`
	Thinking string `json:"thinking"`
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var messages []Message
	if err := json.NewDecoder(os.Stdin).Decode(&messages); err != nil {
		panic(err)
	}
	var system []string
	var collated []*Message
	for i := range messages {
		m := messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == m.Role {
			collated[len(collated)-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &m)
		}
	}
	t := template.Must(template.New("chat").Parse(string(text)))
	values := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated, "IsThinkSet": true,
		"Think": true}
	if err := t.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
