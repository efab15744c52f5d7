/**
 * napari-bcd for QuPath 0.5 / 0.6: classify the open image and import the result.
 *
 * Runs `napari-bcd classify` on the image's file (QuPath's pixel size is passed as --mpp when the
 * file has none), shows its progress, then imports the class regions as classified annotations,
 * each with its measurements (area, % of tissue, mean probability of every class).
 *
 * Set NAPARI_BCD below to the napari-bcd command of your installation (e.g.
 * "/home/me/envs/bcd/bin/napari-bcd", or "napari-bcd" when it is on the PATH), and MODEL to a
 * checkpoint ("" = napari-bcd's default model).  Run from Automate > Script editor > Run.
 */
import javafx.application.Platform
import javafx.scene.Scene
import javafx.scene.control.Label
import javafx.scene.control.ProgressBar
import javafx.scene.layout.VBox
import javafx.stage.Stage
import qupath.lib.common.GeneralTools
import qupath.lib.io.PathIO

import java.nio.file.Files
import java.nio.file.Paths

def NAPARI_BCD = "napari-bcd"
def MODEL = ""
def EXTRA = []   // e.g. ["--stride", "0.5", "--threshold", "Invasive=0.3"]

def imageData = getCurrentImageData()
if (imageData == null) {
    println "napari-bcd: open an image first"
    return
}
def server = imageData.getServer()
def uris = server.getURIs()
if (uris.isEmpty()) {
    println "napari-bcd: this image has no file napari-bcd could read"
    return
}
def slidePath = GeneralTools.toPath(uris[0]).toString()
def cal = server.getPixelCalibration()
def mpp = cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() : null
def outDir = Files.createTempDirectory("napari-bcd-").toString()

// napari-bcd command (tests/test_qupath.py reads the lines between these markers)
def cmd = [NAPARI_BCD, "classify", slidePath, "--out", outDir]
if (mpp != null) cmd += ["--mpp", String.valueOf(mpp)]
if (MODEL) cmd += ["--model", MODEL]
cmd += EXTRA
// end of napari-bcd command

def label = new Label("napari-bcd: starting…")
def bar = new ProgressBar(-1)
def stage = null
Platform.runLater {
    stage = new Stage()
    stage.setTitle("napari-bcd: " + GeneralTools.getNameWithoutExtension(slidePath))
    def box = new VBox(8, label, bar)
    box.setStyle("-fx-padding: 12;")
    bar.setPrefWidth(420)
    stage.setScene(new Scene(box))
    stage.show()
}

def pb = new ProcessBuilder(cmd.collect { it.toString() })
pb.redirectErrorStream(true)
def process = pb.start()
def log = new StringBuilder()
process.inputStream.withReader("UTF-8") { reader ->
    def buffer = new StringBuilder()
    int c
    while ((c = reader.read()) != -1) {
        if (c == 13 || c == 10) {   // tqdm redraws its bar with carriage returns
            def line = buffer.toString().trim()
            buffer.setLength(0)
            if (!line) continue
            log.append(line).append("\n")
            def m = line =~ /(\d+)%\|/
            Platform.runLater {
                label.setText(line.length() > 90 ? line.substring(0, 90) + "…" : line)
                if (m.find()) bar.setProgress(Integer.parseInt(m.group(1)) / 100.0)
            }
        } else {
            buffer.append((char) c)
        }
    }
}
def code = process.waitFor()
Platform.runLater { if (stage != null) stage.close() }
if (code != 0) {
    println log.toString()
    println "napari-bcd: failed (exit code ${code}); see the lines above"
    return
}

def stem = GeneralTools.getNameWithoutExtension(slidePath)
def geojson = Paths.get(outDir, stem + ".geojson")
def objects = PathIO.readObjects(geojson)
addObjects(objects)
println log.toString()
println "napari-bcd: imported ${objects.size()} classified region(s) from ${geojson} (outputs in ${outDir})"
