//! Incremental stop-string detection for streamed text.
//!
//! Generated text arrives in pieces (one per decoded token, say). A [`StopMatcher`] passes on
//! the text that is safe to show, holds back a tail that could be the beginning of a stop
//! string until it is known not to be, and reports when a stop string completes; the stop
//! string and everything after it are never emitted.
//!
//! Which match wins: generation stops at the first stop string to *complete*, i.e. the
//! occurrence in the whole text that ends earliest; among occurrences ending at the same
//! place, the one starting earliest (the longest) wins. This never makes the caller generate
//! past a completed stop string, and the result does not depend on how the text is split into
//! pushes. It equals "cut at the first occurrence of any stop string" unless one stop string
//! occurs strictly inside a longer one that starts earlier (stops `"bc"` and `"abcd"` on
//! `"abcd"` give `"a"`).

/// What [`StopMatcher::push`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is safe to emit now (possibly empty).
    pub text: String,
    /// Whether a stop string was hit; generation should end. Once set, later pushes emit
    /// nothing and report `true` again.
    pub stopped: bool,
    /// Index, in the list given to [`StopMatcher::new`], of the stop string that was hit
    /// (`None` when `stopped` is false).
    pub matched: Option<usize>,
}

/// Finds stop strings in text pushed piece by piece.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    /// Non-empty stop strings with their index in the caller's list.
    stops: Vec<(usize, String)>,
    /// Received text not emitted yet: always a suffix that could begin a stop string.
    held: String,
    /// The index of the stop string hit, once one is.
    matched: Option<usize>,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored (with none left, every push is
    /// emitted at once and nothing ever stops).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops
                .into_iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .collect(),
            held: String::new(),
            matched: None,
        }
    }

    /// Whether a stop string has been hit.
    pub fn is_stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// Text received but held back because it could begin a stop string.
    pub fn pending(&self) -> &str {
        &self.held
    }

    /// Feed the next piece of generated text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.matched.is_some() {
            return self.stopped_outcome(String::new());
        }
        if self.stops.is_empty() {
            return StopOutcome {
                text: text.to_string(),
                ..StopOutcome::default()
            };
        }
        self.held.push_str(text);

        // The occurrence that ends first (ties: starts first). The first occurrence of each
        // stop string is its earliest-ending one. No occurrence lies wholly inside the text
        // held before this push, or it would have been found then.
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, index)
        for (index, stop) in &self.stops {
            if let Some(start) = self.held.find(stop.as_str()) {
                let cand = (start + stop.len(), start, *index);
                if best.is_none_or(|b| (cand.0, cand.1) < (b.0, b.1)) {
                    best = Some(cand);
                }
            }
        }
        if let Some((_, start, index)) = best {
            self.matched = Some(index);
            let mut emit = std::mem::take(&mut self.held);
            emit.truncate(start);
            return self.stopped_outcome(emit);
        }

        // Hold back from the earliest character boundary where the rest of the text is a
        // proper prefix of some stop string; emit everything before it.
        let keep_from = self.hold_from();
        let rest = self.held.split_off(keep_from);
        let emit = std::mem::replace(&mut self.held, rest);
        StopOutcome {
            text: emit,
            ..StopOutcome::default()
        }
    }

    /// End of generation: the text still held back (nothing if a stop string was hit).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn stopped_outcome(&self, text: String) -> StopOutcome {
        StopOutcome {
            text,
            stopped: true,
            matched: self.matched,
        }
    }

    /// The first byte offset of `held` (a character boundary) from which the remaining text
    /// is a prefix of some stop string, or `held.len()` if there is none.
    fn hold_from(&self) -> usize {
        let longest = self.stops.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        let len = self.held.len();
        let lowest = len.saturating_sub(longest.saturating_sub(1));
        for (pos, _) in self.held.char_indices() {
            if pos < lowest {
                continue;
            }
            let tail = &self.held.as_bytes()[pos..];
            if self
                .stops
                .iter()
                .any(|(_, s)| s.as_bytes().starts_with(tail))
            {
                return pos;
            }
        }
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    /// Push `pieces` in order; return the emitted text (including `finish` when not stopped),
    /// whether it stopped, and the matched index.
    fn run(m: &mut StopMatcher, pieces: &[&str]) -> (String, bool, Option<usize>) {
        let mut out = String::new();
        let mut stopped = false;
        let mut matched = None;
        for p in pieces {
            let o = m.push(p);
            assert!(!stopped || o.text.is_empty(), "text after the stop");
            out.push_str(&o.text);
            if o.stopped && !stopped {
                stopped = true;
                matched = o.matched;
            }
            assert_eq!(o.stopped, o.matched.is_some());
        }
        let tail = m.finish();
        assert!(!stopped || tail.is_empty());
        out.push_str(&tail);
        (out, stopped, matched)
    }

    /// Brute force on the whole text: the occurrence that ends first (ties: starts first).
    fn reference(text: &str, stops: &[&str]) -> (String, bool) {
        let mut best: Option<(usize, usize)> = None;
        for s in stops.iter().filter(|s| !s.is_empty()) {
            for start in 0..=text.len() {
                if text.is_char_boundary(start) && text[start..].starts_with(s) {
                    let c = (start + s.len(), start);
                    if best.is_none_or(|b| c < b) {
                        best = Some(c);
                    }
                }
            }
        }
        match best {
            Some((_, start)) => (text[..start].to_string(), true),
            None => (text.to_string(), false),
        }
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut m = matcher(&[]);
        let o = m.push("hello");
        assert_eq!(o.text, "hello");
        assert!(!o.stopped);
        assert_eq!(m.finish(), "");
        let mut m = matcher(&["", ""]);
        assert_eq!(run(&mut m, &["a", "b"]), ("ab".to_string(), false, None));
    }

    #[test]
    fn stop_within_one_push() {
        let mut m = matcher(&["END"]);
        let o = m.push("hello END world");
        assert_eq!(o.text, "hello ");
        assert!(o.stopped);
        assert_eq!(o.matched, Some(0));
        assert!(m.is_stopped());
        let o = m.push("more");
        assert_eq!((o.text.as_str(), o.stopped), ("", true));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn partial_match_is_held_then_released() {
        let mut m = matcher(&["</s>"]);
        let o = m.push("a </");
        assert_eq!(o.text, "a ");
        assert_eq!(m.pending(), "</");
        let o = m.push("b>");
        assert_eq!(o.text, "</b>");
        assert!(!o.stopped);
        assert_eq!(m.pending(), "");
        let o = m.push("x<");
        assert_eq!(o.text, "x");
        assert_eq!(m.finish(), "<");
    }

    #[test]
    fn stop_split_across_pushes() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(
            run(&mut m, &["abc S", "T", "O", "Pxyz"]),
            ("abc ".to_string(), true, Some(0))
        );
        let mut m = matcher(&["STOP"]);
        assert_eq!(
            run(&mut m, &["abc ST", "OX", "STO"]),
            ("abc STOXSTO".to_string(), false, None)
        );
    }

    #[test]
    fn overlapping_candidates_earliest_wins() {
        // "ab" and "b" both end at the same place: the earlier start wins.
        let mut m = matcher(&["b", "ab"]);
        assert_eq!(run(&mut m, &["xa", "by"]), ("x".to_string(), true, Some(1)));
        let mut m = matcher(&["b", "ab"]);
        assert_eq!(run(&mut m, &["xaby"]), ("x".to_string(), true, Some(1)));
        // "b" alone.
        let mut m = matcher(&["ab", "b"]);
        assert_eq!(
            run(&mut m, &["xc", "by"]),
            ("xc".to_string(), true, Some(1))
        );
        // A stop that is a prefix of another: the shorter completes first.
        let mut m = matcher(&["abc", "ab"]);
        assert_eq!(run(&mut m, &["zab", "c"]), ("z".to_string(), true, Some(1)));
        // Self-overlapping stop string.
        let mut m = matcher(&["aab"]);
        assert_eq!(
            run(&mut m, &["a", "a", "a", "b"]),
            ("a".to_string(), true, Some(0))
        );
    }

    #[test]
    fn first_completed_stop_wins_over_earlier_start() {
        let mut m = matcher(&["abcd", "bc"]);
        assert_eq!(run(&mut m, &["abcd"]), ("a".to_string(), true, Some(1)));
        let mut m = matcher(&["abcd", "bc"]);
        assert_eq!(
            run(&mut m, &["a", "b", "c", "d"]),
            ("a".to_string(), true, Some(1))
        );
    }

    #[test]
    fn multibyte_stop_strings() {
        // "é" is two bytes, "日本" six; pushes are whole characters, stops may start with a
        // character shared by ordinary text.
        let mut m = matcher(&["日本語", "é!"]);
        assert_eq!(
            run(&mut m, &["x日", "本", "人 é", "?é", "!z"]),
            ("x日本人 é?".to_string(), true, Some(1))
        );
        let mut m = matcher(&["日本語"]);
        let o = m.push("a日本");
        assert_eq!(o.text, "a");
        assert_eq!(m.pending(), "日本");
        let o = m.push("語b");
        assert_eq!((o.text.as_str(), o.stopped), ("", true));
        // A stop whose first byte is shared with another character's encoding.
        let mut m = matcher(&["é"]);
        assert_eq!(
            run(&mut m, &["è", "ê", "ë"]),
            ("èêë".to_string(), false, None)
        );
        let mut m = matcher(&["🙂end"]);
        assert_eq!(
            run(&mut m, &["🙂", "en", "x🙂e", "nd"]),
            ("🙂enx".to_string(), true, Some(0))
        );
    }

    #[test]
    fn matched_index_counts_ignored_empty_strings() {
        let mut m = matcher(&["", "zz", "", "q"]);
        assert_eq!(run(&mut m, &["abq"]), ("ab".to_string(), true, Some(3)));
    }

    #[test]
    fn held_text_stays_bounded() {
        let mut m = matcher(&["abcdef"]);
        for _ in 0..1000 {
            m.push("abcde");
            assert!(m.pending().len() < 6);
        }
    }

    #[test]
    fn property_matches_brute_force() {
        // Deterministic pseudo-random texts over a small alphabet with a multi-byte letter.
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let alphabet = ['a', 'b', 'c', 'é', '日'];
        for case in 0..5000 {
            let word = |len: usize, next: &mut dyn FnMut(usize) -> usize| -> String {
                (0..len).map(|_| alphabet[next(alphabet.len())]).collect()
            };
            let text_len = next(25);
            let text = word(text_len, &mut next);
            let n_stops = next(4);
            let stops: Vec<String> = (0..n_stops)
                .map(|_| {
                    let l = next(4);
                    word(l, &mut next)
                })
                .collect();
            // Random split points on character boundaries.
            let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            let mut cuts: Vec<usize> = bounds.iter().copied().filter(|_| next(3) == 0).collect();
            cuts.push(text.len());
            let mut pieces = Vec::new();
            let mut prev = 0;
            for c in cuts {
                if c >= prev {
                    pieces.push(&text[prev..c]);
                    prev = c;
                }
            }
            let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            let mut m = StopMatcher::new(stops.clone());
            let (got, stopped, matched) = run(&mut m, &pieces);
            let (want, want_stopped) = reference(&text, &stop_refs);
            assert_eq!(
                (&got, stopped),
                (&want, want_stopped),
                "case {case}: text {text:?} pieces {pieces:?} stops {stops:?}"
            );
            if let Some(i) = matched {
                // The matched stop string starts right where the emitted text ends.
                assert!(text[got.len()..].starts_with(&stops[i]), "case {case}");
            }
        }
    }
}
