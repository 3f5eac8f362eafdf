//! A minimal aligned text table for `images show`.

/// A plain text table: first `left` columns left-aligned, the rest right-aligned.
pub(super) struct Table {
    pub left: usize,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Appends the table to `out`; `groups` are `(first column, last column, title)` spans
    /// drawn as a line of titles above the header.
    pub fn render(&self, out: &mut String, groups: &[(usize, usize, &str)]) {
        let ncols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut width: Vec<usize> = (0..ncols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let sep = 2;
        // Widen a group's last column if its title does not fit over the group.
        for &(first, last, title) in groups {
            let span: usize = width[first..=last].iter().sum::<usize>() + sep * (last - first);
            let need = title.chars().count() + 4;
            if need > span {
                width[last] += need - span;
            }
        }
        let start: Vec<usize> = width
            .iter()
            .scan(0, |at, w| {
                let s = *at;
                *at += w + sep;
                Some(s)
            })
            .collect();
        // Group titles centred over their columns, e.g. "──── present ────".
        if !groups.is_empty() {
            let mut line = String::new();
            for &(first, last, title) in groups {
                let (from, to) = (start[first], start[last] + width[last]);
                let span = to - from;
                let label = format!(" {title} ");
                let fill = span.saturating_sub(label.chars().count());
                let pad = " ".repeat(from.saturating_sub(line.chars().count()));
                line.push_str(&pad);
                line.push_str(&"─".repeat(fill / 2));
                line.push_str(&label);
                line.push_str(&"─".repeat(fill - fill / 2));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push_str(&" ".repeat(sep));
                }
                let pad = width[c] - cell.chars().count();
                if c < self.left {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}
