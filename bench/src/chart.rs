//! The benchmark's SVG charts, drawn the same way for bench/iops.svg
//! (lines) and the guest report (bars): numbers in compact SI form (1.2M,
//! 2k, 500), a title and a line naming the machine (and the accelerator),
//! the legend in a column right of the plots (never over them), and a
//! label under every group of bars, centred on it.

use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// Where a chart is drawn: the whole SVG or a part of it.
pub type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

const FONT: &str = "sans-serif";
/// Pixels of the title and the machine line above the plots.
const TITLE_H: u32 = 56;
/// A generous width of one character of the 13 px font (about 6 px in
/// DejaVu Sans or Arial), to size the legend and the groups of bars.
const CHAR_W: u32 = 7;
/// Pixels left of a plot for the y axis' numbers and its name.
const Y_AREA: u32 = 64;
/// Pixels under a plot for the x axis' labels (two lines) and its name.
const X_AREA: u32 = 56;
/// One line of the legend.
const LEGEND_ROW: i32 = 20;

/// Series colours of the charts.
pub const PALETTE: [RGBColor; 12] = [
    RGBColor(200, 40, 40),
    RGBColor(230, 140, 30),
    RGBColor(40, 90, 200),
    RGBColor(120, 60, 180),
    RGBColor(60, 170, 190),
    RGBColor(60, 150, 60),
    RGBColor(120, 120, 120),
    RGBColor(170, 110, 60),
    RGBColor(0, 0, 0),
    RGBColor(220, 90, 160),
    RGBColor(90, 90, 40),
    RGBColor(40, 160, 120),
];

/// The colour of series `k`.
pub fn color(k: usize) -> RGBColor {
    PALETTE[k % PALETTE.len()]
}

/// A number as people read it on an axis: at most three significant
/// digits, a k, M or G for thousands, millions and billions, and no
/// trailing zeros: 1200000 is `1.2M`, 2000 `2k`, 1500 `1.5k`, 999 `999`,
/// 12.5 `12.5`, 0 `0`.
pub fn si(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v < 0.0 {
        return format!("-{}", si(-v));
    }
    const PREFIXES: [(f64, &str); 4] = [(1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G")];
    let mut i = PREFIXES.iter().rposition(|p| v >= p.0).unwrap_or(0);
    loop {
        let (scale, prefix) = PREFIXES[i];
        let x = v / scale;
        let decimals = if x >= 99.95 {
            0
        } else if x >= 9.995 {
            1
        } else {
            2
        };
        let s = format!("{x:.decimals$}");
        // 999.7 rounds to 1000: that is 1k.
        if s.parse::<f64>().unwrap_or(0.0) >= 1000.0 && i + 1 < PREFIXES.len() {
            i += 1;
            continue;
        }
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            &s
        };
        return format!("{s}{prefix}");
    }
}

/// The CPU model and core count of a machine line of the benchmark
/// ("AMD EPYC, 2 cores, 23 GiB, Linux 6.1" is "AMD EPYC, 2 cores").
pub fn cpu_and_cores(machine: &str) -> String {
    let parts: Vec<&str> = machine.split(", ").collect();
    match parts.iter().position(|p| p.ends_with(" cores")) {
        Some(i) => parts[..=i].join(", "),
        None => machine.to_string(),
    }
}

/// The machine a results file records, else this one (read now).
pub fn machine_of(v: &Value) -> String {
    let m = v["machine"]
        .as_str()
        .filter(|m| !m.is_empty())
        .map_or_else(crate::machine, str::to_string);
    cpu_and_cores(&m)
}

/// How a series is marked in the legend.
#[derive(Clone, Copy)]
pub enum Mark {
    Bar,
    Line,
}

/// What surrounds the plots: the title, the line under it, the legend,
/// and the size of the plots' area (the SVG is larger by the title and
/// the legend).
pub struct Frame {
    pub title: String,
    pub subtitle: String,
    pub legend: Vec<(String, RGBColor)>,
    pub mark: Mark,
    pub plots: (u32, u32),
}

/// A count of things as pixels (saturating: no chart is that large).
fn px(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX / 4)
}

/// A count of things as a pixel offset.
fn offset(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX / 4)
}

fn legend_width(legend: &[(String, RGBColor)]) -> u32 {
    let chars = legend.iter().map(|l| l.0.chars().count()).max();
    px(chars.unwrap_or(0)) * CHAR_W + 56
}

fn text_style(size: u32, pos: Pos) -> TextStyle<'static> {
    (FONT, size).into_font().color(&BLACK).pos(pos)
}

/// The SVG of a chart: the frame drawn, then `draw` on the plots' area.
pub fn svg(f: &Frame, draw: impl FnOnce(&Area<'_>) -> Result<()>) -> Result<String> {
    let legend_w = legend_width(&f.legend);
    let (w, h) = (f.plots.0 + legend_w, f.plots.1 + TITLE_H);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let top = Pos::new(HPos::Center, VPos::Top);
        let mid = i32::try_from(w / 2).unwrap_or(0);
        root.draw(&Text::new(f.title.as_str(), (mid, 8), text_style(18, top)))?;
        root.draw(&Text::new(
            f.subtitle.as_str(),
            (mid, 32),
            text_style(13, top),
        ))?;
        let (_, body) = root.split_vertically(TITLE_H);
        let (plots, side) = body.split_horizontally(f.plots.0);
        draw_legend(&side, &f.legend, f.mark)?;
        draw(&plots)?;
        root.present()?;
    }
    Ok(out)
}

/// The legend, one series a line, from the top of its column (the height
/// of the plots' top margin and caption).
fn draw_legend(area: &Area<'_>, legend: &[(String, RGBColor)], mark: Mark) -> Result<()> {
    let left = Pos::new(HPos::Left, VPos::Center);
    for (i, (name, c)) in legend.iter().enumerate() {
        let y = 40 + offset(i) * LEGEND_ROW;
        match mark {
            Mark::Bar => area.draw(&Rectangle::new([(12, y - 6), (26, y + 6)], c.filled()))?,
            Mark::Line => {
                area.draw(&PathElement::new(vec![(8, y), (30, y)], c.stroke_width(3)))?;
                area.draw(&Circle::new((19, y), 3, c.filled()))?;
            }
        }
        area.draw(&Text::new(name.as_str(), (38, y), text_style(13, left)))?;
    }
    Ok(())
}

/// Labels under the x axis, each centred on its point (given in pixels of
/// the SVG); a `/` in a label breaks it into lines.
fn x_labels(area: &Area<'_>, at: &[((i32, i32), String)]) -> Result<()> {
    let (bx, by) = area.get_base_pixel();
    let style = text_style(13, Pos::new(HPos::Center, VPos::Top));
    for ((x, y), label) in at {
        for (k, line) in label.split('/').enumerate() {
            let pos = (x - bx, y - by + 8 + 16 * offset(k));
            area.draw(&Text::new(line, pos, style.clone()))?;
        }
    }
    Ok(())
}

/// Bars: a group per entry of `groups`, a bar per series in each group,
/// `value(group, series)` high (none where it is `None`).
pub struct Bars<'a> {
    pub title: String,
    pub subtitle: String,
    pub groups: &'a [String],
    pub series: &'a [String],
    pub value: &'a dyn Fn(usize, usize) -> Option<f64>,
    pub y_desc: &'a str,
}

/// A bar chart, wide enough for every group's label and bars.
pub fn bars(b: &Bars<'_>) -> Result<String> {
    let label_w = b.groups.iter().flat_map(|g| g.split('/'));
    let label_w = px(label_w.map(|l| l.chars().count()).max().unwrap_or(0)) * CHAR_W;
    let group_w = (label_w + 16).max(px(b.series.len()) * 9);
    let width = (px(b.groups.len()) * group_w + Y_AREA + 24).max(760);
    let frame = Frame {
        title: b.title.clone(),
        subtitle: b.subtitle.clone(),
        legend: (b.series.iter().enumerate())
            .map(|(k, s)| (s.clone(), color(k)))
            .collect(),
        mark: Mark::Bar,
        plots: (width, 420),
    };
    svg(&frame, |area| draw_bars(area, b))
}

fn draw_bars(area: &Area<'_>, b: &Bars<'_>) -> Result<()> {
    let (ng, ns) = (b.groups.len(), b.series.len().max(1));
    let values = (0..ng).flat_map(|i| (0..ns).filter_map(move |k| (b.value)(i, k)));
    let ymax = values.fold(1.0, f64::max) * 1.08;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(X_AREA)
        .y_label_area_size(Y_AREA)
        .build_cartesian_2d(0f64..ng.max(1) as f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .max_light_lines(0)
        .y_label_formatter(&|v| si(*v))
        .y_desc(b.y_desc)
        .label_style((FONT, 13))
        .draw()?;
    let w = 0.8 / ns as f64;
    for k in 0..ns {
        let c = color(k);
        chart.draw_series((0..ng).filter_map(|i| {
            let x0 = i as f64 + 0.1 + w * k as f64;
            let v = (b.value)(i, k)?;
            Some(Rectangle::new([(x0, 0.0), (x0 + w, v)], c.filled()))
        }))?;
    }
    let at: Vec<_> = (b.groups.iter().enumerate())
        .map(|(i, g)| (chart.backend_coord(&(i as f64 + 0.5, 0.0)), g.clone()))
        .collect();
    x_labels(area, &at)
}

/// A line: its name, colour and points.
pub type Series = (String, RGBColor, Vec<(f64, f64)>);

/// One plot of a line chart: its caption, the y axis' name and the
/// series (name, colour, points), on a logarithmic x axis.
pub struct Panel {
    pub caption: String,
    pub y_desc: String,
    pub series: Vec<Series>,
}

/// Line charts side by side with one legend (the series of every panel)
/// and labels on the x axis at the points' x.
pub fn lines(title: &str, subtitle: &str, x_desc: &str, panels: &[Panel]) -> Result<String> {
    let mut legend: Vec<(String, RGBColor)> = Vec::new();
    for (name, c, _) in panels.iter().flat_map(|p| &p.series) {
        if !legend.iter().any(|l| &l.0 == name) {
            legend.push((name.clone(), *c));
        }
    }
    let frame = Frame {
        title: title.to_string(),
        subtitle: subtitle.to_string(),
        legend,
        mark: Mark::Line,
        plots: (480 * px(panels.len().max(1)), 400),
    };
    svg(&frame, |area| {
        let parts = area.split_evenly((1, panels.len().max(1)));
        for (p, part) in panels.iter().zip(&parts) {
            draw_panel(part, p, x_desc)?;
        }
        Ok(())
    })
}

fn draw_panel(area: &Area<'_>, p: &Panel, x_desc: &str) -> Result<()> {
    let mut xs: Vec<f64> = p
        .series
        .iter()
        .flat_map(|s| s.2.iter().map(|q| q.0))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let (lo, hi) = (xs.first().copied(), xs.last().copied());
    let (lo, hi) = (lo.unwrap_or(1.0).max(1e-3), hi.unwrap_or(1.0).max(1e-3));
    let points = p.series.iter().flat_map(|s| s.2.iter().map(|q| q.1));
    let ymax = points.fold(1.0, f64::max) * 1.08;
    let mut chart = ChartBuilder::on(area)
        .caption(p.caption.as_str(), (FONT, 15))
        .margin(12)
        .x_label_area_size(X_AREA)
        .y_label_area_size(Y_AREA)
        .build_cartesian_2d((lo / 1.3..hi * 1.3).log_scale(), 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        // A logarithmic axis keeps one label even at 0: ours are drawn.
        .x_label_formatter(&|_| String::new())
        .max_light_lines(0)
        .y_label_formatter(&|v| si(*v))
        .x_desc(x_desc)
        .y_desc(p.y_desc.as_str())
        .label_style((FONT, 13))
        .draw()?;
    for (_, c, v) in &p.series {
        chart.draw_series(LineSeries::new(v.clone(), c.stroke_width(2)))?;
        chart.draw_series(v.iter().map(|q| Circle::new(*q, 3, c.filled())))?;
    }
    let at: Vec<_> = (xs.iter())
        .map(|x| (chart.backend_coord(&(*x, 0.0)), si(*x)))
        .collect();
    x_labels(area, &at)
}

/// What the tests read back from an SVG of plotters.
#[cfg(test)]
pub mod read {
    /// An attribute of an element's opening tag.
    fn attr(tag: &str, name: &str) -> Option<String> {
        let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        Some(tag[at..].split('"').next()?.to_string())
    }

    fn num(tag: &str, name: &str) -> f64 {
        attr(tag, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// The opening tags of the elements named `el`, each with what follows
    /// it up to the next tag (a text element's text).
    fn elements<'a>(svg: &'a str, el: &str) -> Vec<(&'a str, &'a str)> {
        let open = format!("<{el} ");
        svg.match_indices(&open)
            .map(|(i, _)| {
                let rest = &svg[i..];
                let end = rest.find('>').unwrap_or(rest.len());
                let after = &rest[(end + 1).min(rest.len())..];
                let text = after.split('<').next().unwrap_or("");
                (&rest[..end], text.trim())
            })
            .collect()
    }

    /// Rectangles: x, y, width, height, fill.
    pub fn rects(svg: &str) -> Vec<(f64, f64, f64, f64, String)> {
        elements(svg, "rect")
            .into_iter()
            .map(|(t, _)| {
                let fill = attr(t, "fill").unwrap_or_default();
                (
                    num(t, "x"),
                    num(t, "y"),
                    num(t, "width"),
                    num(t, "height"),
                    fill,
                )
            })
            .collect()
    }

    /// Texts: x, y, text.
    pub fn texts(svg: &str) -> Vec<(f64, f64, String)> {
        elements(svg, "text")
            .into_iter()
            .map(|(t, s)| (num(t, "x"), num(t, "y"), s.to_string()))
            .collect()
    }

    /// Straight black lines of two points (the axes): x0, y0, x1, y1.
    fn axis_lines(svg: &str) -> Vec<(f64, f64, f64, f64)> {
        elements(svg, "polyline")
            .into_iter()
            .filter(|(t, _)| attr(t, "stroke").as_deref() == Some("#000000"))
            .filter_map(|(t, _)| {
                let p: Vec<f64> = attr(t, "points")?
                    .split([' ', ','])
                    .filter_map(|v| v.parse().ok())
                    .collect();
                (p.len() == 4).then(|| (p[0], p[1], p[2], p[3]))
            })
            .collect()
    }

    /// The plot areas, from their axes: x0, y0 (top left), x1, y1 (bottom
    /// right); a y axis is the longest vertical black line at its x, its
    /// x axis the longest horizontal one that starts there.
    pub fn plot_areas(svg: &str) -> Vec<(f64, f64, f64, f64)> {
        let lines = axis_lines(svg);
        let len = |l: &(f64, f64, f64, f64)| (l.2 - l.0).abs() + (l.3 - l.1).abs();
        let vertical = lines.iter().filter(|l| l.0 == l.2 && len(l) > 100.0);
        vertical
            .filter_map(|y| {
                let (top, bottom) = (y.1.min(y.3), y.1.max(y.3));
                let x = lines
                    .iter()
                    .filter(|l| l.1 == l.3 && (l.0.min(l.2) - y.0).abs() <= 2.0)
                    .max_by(|a, b| len(a).total_cmp(&len(b)))?;
                Some((y.0, top, x.0.max(x.2), bottom.max(x.1)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_compact_si_without_trailing_zeros() {
        let cases = [
            (1_200_000.0, "1.2M"),
            (2000.0, "2k"),
            (0.0, "0"),
            (1500.0, "1.5k"),
            (999.0, "999"),
            (500.0, "500"),
            (12.5, "12.5"),
            (0.25, "0.25"),
            (100_000.0, "100k"),
            (35_000.0, "35k"),
            (123_456.0, "123k"),
            (999_700.0, "1M"),
            (2.5e9, "2.5G"),
            (-1500.0, "-1.5k"),
        ];
        for (v, want) in cases {
            assert_eq!(si(v), want, "si({v})");
        }
    }

    #[test]
    fn the_machine_line_keeps_the_cpu_and_its_cores() {
        assert_eq!(
            cpu_and_cores("AMD EPYC, 2 cores, 23 GiB, Linux 6.18.44"),
            "AMD EPYC, 2 cores"
        );
        assert_eq!(cpu_and_cores("something else"), "something else");
        let v = serde_json::json!({"machine": "Intel Xeon, 8 cores, 64 GiB, Linux 6.1"});
        assert_eq!(machine_of(&v), "Intel Xeon, 8 cores");
    }
}
