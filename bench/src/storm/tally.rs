//! What the generators report, device by device: which tunnels are up,
//! when each came back after the kill, and the failures by cause.

use std::collections::BTreeMap;

/// Failures by (pivot not up yet?, cause): (count, first detail).
type Causes = BTreeMap<(bool, String), (usize, String)>;

/// What the generators reported, device by device.
pub(super) struct Tally {
    pub(super) nofile: Vec<u64>,
    pub(super) up: Vec<bool>,
    pub(super) up_count: usize,
    /// The latest "up" (unix ns).
    pub(super) last_up: u64,
    /// When the pivot was killed: later events belong to the storm.
    pub(super) kill: Option<u64>,
    /// Each device's first tunnel after the kill.
    pub(super) back: Vec<Option<u64>>,
    pub(super) back_count: usize,
    /// Tunnels that ended after the kill (and before coming back).
    pub(super) storm_downs: usize,
    /// Tunnels that came back and ended again, by cause: (count, first detail).
    pub(super) lost_after_back: BTreeMap<String, (usize, String)>,
    pub(super) ramp_failures: Causes,
    pub(super) storm_failures: Causes,
}

impl Tally {
    pub(super) fn new(n: usize) -> Tally {
        Tally {
            nofile: Vec::new(),
            up: vec![false; n],
            up_count: 0,
            last_up: 0,
            kill: None,
            back: vec![None; n],
            back_count: 0,
            storm_downs: 0,
            lost_after_back: BTreeMap::new(),
            ramp_failures: Causes::new(),
            storm_failures: Causes::new(),
        }
    }

    pub(super) fn event(&mut self, line: &str) {
        if let Some(limit) = line.strip_prefix("nofile ") {
            self.nofile.extend(limit.trim().parse::<u64>().ok());
            return;
        }
        let mut it = line.splitn(4, ' ');
        let (Some(kind), Some(i), Some(ns)) = (it.next(), it.next(), it.next()) else {
            return;
        };
        let (Ok(i), Ok(ns)) = (i.parse::<usize>(), ns.parse::<u64>()) else { return };
        if i >= self.up.len() {
            return;
        }
        let storm = self.kill.is_some_and(|k| ns >= k);
        match kind {
            "up" => {
                if !self.up[i] {
                    self.up[i] = true;
                    self.up_count += 1;
                }
                self.last_up = self.last_up.max(ns);
                if storm && self.back[i].is_none() {
                    self.back[i] = Some(ns);
                    self.back_count += 1;
                }
            }
            "down" => {
                if self.up[i] {
                    self.up[i] = false;
                    self.up_count -= 1;
                }
                match (storm, self.back[i].is_some()) {
                    (true, false) => self.storm_downs += 1,
                    (true, true) => {
                        let rest = it.next().unwrap_or("");
                        let (cause, detail) = rest.split_once('\t').unwrap_or((rest, ""));
                        let c = self.lost_after_back.entry(cause.to_string()).or_insert((0, detail.to_string()));
                        c.0 += 1;
                    }
                    _ => {}
                }
            }
            "fail" => {
                let rest = it.next().unwrap_or("");
                let (class, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                let (cause, detail) = rest.split_once('\t').unwrap_or((rest, ""));
                let causes = if storm { &mut self.storm_failures } else { &mut self.ramp_failures };
                let c = causes.entry((class == "notup", cause.to_string())).or_insert((0, detail.to_string()));
                c.0 += 1;
            }
            _ => {}
        }
    }

    /// The failures of the ramp or of the storm, one cause a line.
    pub(super) fn causes(&self, storm: bool) -> String {
        let causes = if storm { &self.storm_failures } else { &self.ramp_failures };
        let mut out = String::new();
        for ((not_up, cause), (count, detail)) in causes {
            let class = if *not_up { "pivot not up yet" } else { "other" };
            out.push_str(&format!("    {count:>7}  {class}: {cause}  (e.g. \"{detail}\")\n"));
        }
        out
    }
}
