// Count word frequencies across many files in parallel, then print the top N.
//
//     wordfreq --top 20 docs/*.txt
//
// Each worker thread takes file paths from a shared channel, counts words into
// its own HashMap, and sends the map back; the main thread merges the maps.

use std::collections::HashMap;
use std::env;
use std::fs;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

fn normalise(word: &str) -> Option<String> {
    let w: String = word
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '\'')
        .flat_map(|c| c.to_lowercase())
        .collect();
    let w = w.trim_matches('\'').to_string();
    if w.is_empty() { None } else { Some(w) }
}

fn count_words(text: &str, counts: &mut HashMap<String, u64>) {
    for raw in text.split_whitespace() {
        if let Some(word) = normalise(raw) {
            *counts.entry(word).or_insert(0) += 1;
        }
    }
}

fn parse_args() -> (usize, Vec<PathBuf>) {
    let mut top = 10;
    let mut files = Vec::new();
    let mut args = env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--top" {
            top = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--top needs a number");
        } else {
            files.push(PathBuf::from(arg));
        }
    }
    if files.is_empty() {
        eprintln!("usage: wordfreq [--top N] FILE...");
        std::process::exit(2);
    }
    (top, files)
}

fn main() {
    let (top, files) = parse_args();
    let workers = thread::available_parallelism().map(|n| n.get()).unwrap_or(4).min(files.len());

    let (path_tx, path_rx) = mpsc::channel::<PathBuf>();
    let path_rx = Arc::new(Mutex::new(path_rx));
    let (result_tx, result_rx) = mpsc::channel::<HashMap<String, u64>>();

    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let rx = Arc::clone(&path_rx);
        let tx = result_tx.clone();
        handles.push(thread::spawn(move || {
            let mut local = HashMap::new();
            loop {
                // hold the lock only while taking the next path
                let next = rx.lock().unwrap().recv();
                match next {
                    Ok(path) => match fs::read_to_string(&path) {
                        Ok(text) => count_words(&text, &mut local),
                        Err(err) => eprintln!("skipping {}: {}", path.display(), err),
                    },
                    Err(_) => break, // channel closed: no more work
                }
            }
            tx.send(local).expect("main thread gone");
        }));
    }
    drop(result_tx);

    for f in files {
        path_tx.send(f).unwrap();
    }
    drop(path_tx);

    let mut total: HashMap<String, u64> = HashMap::new();
    for partial in result_rx {
        for (word, n) in partial {
            *total.entry(word).or_insert(0) += n;
        }
    }
    for h in handles {
        h.join().unwrap();
    }

    let mut ranked: Vec<(String, u64)> = total.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let width = ranked.iter().take(top).map(|(w, _)| w.len()).max().unwrap_or(4);
    for (word, n) in ranked.into_iter().take(top) {
        println!("{:<width$}  {:>8}", word, n, width = width);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_punctuation_and_case() {
        let mut counts = HashMap::new();
        count_words("The cat's hat. THE hat! 'quoted'", &mut counts);
        assert_eq!(counts["the"], 2);
        assert_eq!(counts["hat"], 2);
        assert_eq!(counts["cat's"], 1);
        assert_eq!(counts["quoted"], 1);
    }
}
